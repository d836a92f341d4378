"""The verl plugin under tensor parallelism (no verl needed: the kernel contract and the routing logic).

verl 0.9.1's Megatron engine calls ``linear_cross_entropy(hidden [S, 1, H], weight shard [V/tp, H],
labels [1, S], temperature, "none", tp_group)`` with rank-ordered equal shards and expects a partial hidden
gradient (its sequence-parallel gather sums it). On gloo at world sizes 2 and 3:
:func:`verl_linear_cross_entropy` with ``dist_process_group`` equals the unsharded float64 call (log-probs,
entropy, dW of the shard, and dh summed over the ranks), and each rank's dh is partial. Then, in one
process, the routing of the Megatron fused forward's module global and the engine wrapper, on stand-ins for
verl's module and ``MegatronEngine`` (verl's own Megatron engine needs megatron-core and CUDA).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from _spawn import run_world
from upg_kernels.integrations.verl import kernel as K

V_LOCAL = 7


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _worker(rank, world):
    import torch.distributed as dist
    import upg_kernels
    V = V_LOCAL * world
    g = torch.Generator().manual_seed(4)
    S, H = 9, 8
    h = torch.randn(S, 1, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    labels = torch.randint(0, V, (1, S), generator=g)
    a, b = torch.randn(S, generator=g, dtype=torch.float64), torch.randn(S, generator=g, dtype=torch.float64)
    res = {}
    for temp in (1.0, 0.7):
        hr, Wr = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        lp, ent = upg_kernels.token_logprobs(hr.reshape(S, H), Wr, labels.reshape(S), temperature=temp,
                                             return_entropy=True, backend="torch")
        (a * lp + b * ent).sum().backward()
        hs = h.clone().requires_grad_(True)
        Ws = W[rank * V_LOCAL:(rank + 1) * V_LOCAL].clone().requires_grad_(True)
        lp2, ent2 = K.verl_linear_cross_entropy(hs, Ws, labels, temp, "none", dist.group.WORLD, backend="torch")
        (a * lp2 + b * ent2).sum().backward()
        dh = hs.grad.clone()
        dist.all_reduce(dh)
        res[f"t{temp}"] = {"logp": _rel(lp2, lp), "entropy": _rel(ent2, ent), "dh_sum": _rel(dh, hr.grad),
                           "dW": _rel(Ws.grad, Wr.grad[rank * V_LOCAL:(rank + 1) * V_LOCAL]),
                           "shape": list(lp2.shape)}
        res[f"t{temp}-partial"] = float((hs.grad - hr.grad).abs().max())
    res["same_options"] = K.verl_tp_options(dist.group.WORLD, V_LOCAL) is K.verl_tp_options(dist.group.WORLD, V_LOCAL)
    return res


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def results(request):
    return run_world(_worker, request.param)


def test_verl_kernel_contract_under_tp(results):
    for r in results:
        for temp in (1.0, 0.7):
            d = r[f"t{temp}"]
            assert d.pop("shape") == [9]
            assert max(d.values()) < 1e-10, d
            assert r[f"t{temp}-partial"] > 1e-3      # each rank's dh is its partial one (verl's contract)
        assert r["same_options"]


def test_route_megatron_fused_module_global(monkeypatch):
    calls = []

    def verl_kernel(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        calls.append("verl")

    mod = types.ModuleType("fake_mcore_fused")
    mod.linear_cross_entropy = verl_kernel
    monkeypatch.setitem(sys.modules, "fake_mcore_fused", mod)
    assert K.route_megatron_fused(("fake_mcore_fused", "not_a_module_anywhere")) == ["fake_mcore_fused"]
    routed = mod.linear_cross_entropy
    assert routed._upg_original is verl_kernel
    K.route_megatron_fused(("fake_mcore_fused",))
    assert mod.linear_cross_entropy is routed                  # idempotent
    h, w = torch.randn(4, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    t = torch.randint(0, 11, (4,))
    lp, ent = routed(h, w, t, 0.7, "none", None)
    want_lp, want_ent = K.token_logprobs(h, w, t, temperature=0.7, return_entropy=True)
    assert torch.equal(lp, want_lp) and torch.equal(ent, want_ent) and calls == []


@pytest.mark.parametrize("backend,fused,routed", [("upg", True, True), ("torch", True, False), ("upg", False, False)])
def test_megatron_engine_wrapper(monkeypatch, backend, fused, routed):
    seen = []
    monkeypatch.setattr(K, "route_megatron_fused", lambda: seen.append(True))

    class Engine:   # the two attributes verl's MegatronEngine has
        def __init__(self):
            self.model_config = types.SimpleNamespace(fused_kernel_options={"impl_backend": backend})
            self.engine_config = types.SimpleNamespace(use_fused_kernels=fused)

        def _maybe_enable_fused_kernels(self):
            seen.append("verl")

    K.wrap_megatron_engine(Engine)
    K.wrap_megatron_engine(Engine)   # idempotent
    Engine()._maybe_enable_fused_kernels()
    assert seen == (["verl", True] if routed else ["verl"])


def test_reduction_other_than_none_is_refused():
    with pytest.raises(ValueError, match="reduction must be 'none'"):
        K.verl_linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                                    1.0, "mean")
