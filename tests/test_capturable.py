"""Capturable mode (``capturable=True``): no host synchronization in the forward + backward of
``token_logprobs`` and the losses, checked on the CPU by a dispatch-mode spy that fails on every op
that reads device values on the host; the results equal the normal mode's (every row runs, inactive
rows contribute exactly 0); out-of-range targets are reported on the device (NaN rows). A CUDA-graph
test runs where a GPU exists."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.memtrace import _real_impl
from upg_kernels import policy_loss_from_logprobs, token_logprobs, unified_policy_loss
from upg_kernels.kernels import LogprobParams, get_backend

from test_logprobs_triton import _inputs, _rel

# ops that copy a device value to the host (or size an output by data, which needs one)
SYNC_OPS = ("nonzero", "nonzero_static", "_local_scalar_dense", "item", "is_nonzero", "masked_select",
            "_unique2", "unique_dim", "unique_consecutive", "equal")
# indexing with a boolean mask runs a nonzero inside the op on the GPU (not visible on the CPU)
BOOL_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")


class NoSync(TorchDispatchMode):
    """Fails on any op of :data:`SYNC_OPS` (and ``Tensor.tolist``, which reads memory directly)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.seen.append(name)
        if name in SYNC_OPS:
            raise AssertionError(f"host synchronization in capturable mode: aten.{name}")
        if name in BOOL_INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] or ())):
            raise AssertionError(f"host synchronization in capturable mode: aten.{name} with a "
                                 "boolean mask (a nonzero on the GPU)")
        impl = _real_impl(func)
        if impl is not None:       # our custom ops: watch the ops of their host code too
            with self:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_sync(monkeypatch):
    def tolist(self, *a, **k):
        raise AssertionError("host synchronization in capturable mode: Tensor.tolist")
    spy = NoSync()

    class Ctx:
        def __enter__(self):
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
            return spy.__enter__()

        def __exit__(self, *exc):
            spy.__exit__(*exc)
            monkeypatch.undo()
    return Ctx


def test_the_spy_catches_syncs(no_sync):
    x = torch.tensor([0.0, 1.0])
    for fn in (lambda: x.nonzero(), lambda: x[0].item(), lambda: bool(x[1]), lambda: x.tolist(),
               lambda: x[x > 0], lambda: float(x.sum())):
        with pytest.raises(AssertionError, match="host synchronization"):
            with no_sync():
                fn()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_spy_sees_the_normal_modes_syncs(no_sync, backend):
    """Without capturable, the forward (target check, row compaction) and the backward alone
    (active rows) synchronize: the spy sees both, so it watches the whole path."""
    h, w, b, t = _inputs(9, 16, 30, ignore_every=4, seed=2)
    with pytest.raises(AssertionError, match="host synchronization"):
        with no_sync():
            token_logprobs(h, w, t, backend=backend)
    hh = h.clone().requires_grad_()
    lp = token_logprobs(hh, w, t, backend=backend)   # the backward of a normal forward
    with pytest.raises(AssertionError, match="host synchronization"):
        with no_sync():
            torch.autograd.grad(lp.sum(), hh)


def _fwd_bwd(backend, h, w, b, t, capturable, **kw):
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    lp, ent, lse = token_logprobs(hh, ww, t, bias=bb, return_entropy=True, return_lse=True,
                                  backend=backend, capturable=capturable, **kw)
    g = torch.Generator().manual_seed(7)
    gl = torch.randn(t.shape, generator=g)
    gl[1::3] = 0.0                                    # zero-gradient rows: skipped or neutralized
    (lp * gl).sum().add((ent * 0.25).sum()).add((lse * 0.1).sum()).backward()
    return [lp, ent, lse, hh.grad, ww.grad] + ([] if b is None else [bb.grad])


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_atomic"])
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=3.0, temperature=0.7)])
def test_token_logprobs_has_no_host_sync_and_matches(no_sync, backend, opts):
    opts = dict(opts)
    h, w, b, t = _inputs(29, 32, 101, bias=opts.pop("bias", False), ignore_every=4, seed=3)
    h[4] = float("nan")                               # an ignored row: must not reach any gradient
    ref = _fwd_bwd(backend, h, w, b, t, False, **opts)
    with no_sync():
        got = _fwd_bwd(backend, h, w, b, t, True, **opts)
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        assert _rel(a, r) <= 1e-6, (backend, _rel(a, r))


def test_backend_backward_runs_every_row_and_inactive_rows_give_zero():
    """The capturable backward runs all N rows; rows with zero coefficients or ignored targets
    contribute exactly 0 even when their hidden state is NaN."""
    N, H, V = 12, 16, 40
    h, w, _, t = _inputs(N, H, V, seed=5)
    t[2] = -100
    h[2] = float("nan")
    h[5] = float("inf")
    be = get_backend("torch")
    p = LogprobParams(capturable=True)
    lp, ent, lse = be.forward(h, w, None, t, p)
    assert lp[2] == 0 and ent[2] == 0 and lse[2] == 0
    gl = torch.randn(N)
    gl[5] = 0.0
    dh, dw, _ = be.backward(h, w, None, t, lse, ent, gl, torch.zeros(N), p, True, True, False)
    ref = be.backward(h, w, None, t, lse, ent, gl, torch.zeros(N), LogprobParams(), True, True, False)
    assert torch.isfinite(dw).all() and torch.equal(dh[2], torch.zeros(H)) and torch.equal(dh[5], torch.zeros(H))
    assert _rel(dw, ref[1]) < 1e-6 and _rel(dh, ref[0]) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_target_is_reported_on_device(no_sync, backend):
    h, w, _, t = _inputs(9, 16, 30, seed=1)
    t[3] = 30
    t[6] = -7
    with no_sync():
        lp, ent = token_logprobs(h, w, t, return_entropy=True, backend=backend, capturable=True)
    assert torch.isnan(lp[3]) and torch.isnan(lp[6]) and torch.isnan(ent[3])
    assert torch.isfinite(lp[[0, 1, 2, 4, 5, 7, 8]]).all()
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(h, w, t, backend=backend)


def _loss_inputs(B=4, T=5, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, -1] = -100
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    old = -torch.rand(B, T, generator=g) * 3
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])      # 2nd group of 2: equal rewards, zero advantage
    return h, w, t, mask, old, rewards


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo"])
def test_unified_loss_has_no_host_sync_and_matches(no_sync, backend, preset):
    h, w, t, mask, old, rewards = _loss_inputs()

    def run(cap):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = unified_policy_loss(hh, ww, t, config=preset, loss_mask=mask, rewards=rewards,
                                  group_size=2, old_logprobs=old, backend=backend, capturable=cap)
        out.loss.backward()
        return out, hh.grad, ww.grad

    ref, rdh, rdw = run(False)
    with no_sync():
        got, dh, dw = run(True)
    assert _rel(got.loss, ref.loss) < 1e-6 and _rel(dh, rdh) < 1e-6 and _rel(dw, rdw) < 1e-6
    assert set(got.metrics) == set(ref.metrics)
    for k, v in got.metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0, k
        assert abs(float(v) - ref.metrics[k]) <= 1e-6 * max(1.0, abs(ref.metrics[k])), k


def test_policy_loss_from_logprobs_has_no_host_sync(no_sync):
    _, _, _, mask, old, _ = _loss_inputs()
    lp = (-torch.rand(4, 5)).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    ref = policy_loss_from_logprobs(lp, config="grpo", loss_mask=mask, advantages=adv, old_logprobs=old)
    with no_sync():
        out = policy_loss_from_logprobs(lp, config="grpo", loss_mask=mask, advantages=adv,
                                        old_logprobs=old, capturable=True)
        g, = torch.autograd.grad(out.loss, lp)
    g_ref, = torch.autograd.grad(ref.loss, lp)
    assert torch.allclose(out.loss, ref.loss) and torch.allclose(g, g_ref)


def test_capturable_refusals():
    h, w, t, mask, old, rewards = _loss_inputs()
    with pytest.raises(ValueError, match="group_size only"):
        unified_policy_loss(h, w, t, config="grpo", rewards=rewards, group_ids=torch.tensor([0, 0, 1, 1]),
                            old_logprobs=old, backend="torch", capturable=True)
    with pytest.raises(ValueError, match="grad_in_forward"):
        unified_policy_loss(h, w, t, config="grpo", rewards=rewards, group_size=2, old_logprobs=old,
                            backend="torch", capturable=True, grad_in_forward=True)
    with pytest.raises(TypeError, match="is_demo"):
        unified_policy_loss(h, w, t, config="hpt", rewards=rewards, group_size=2,
                            is_demo=torch.tensor([0, 0, 1, 1]), backend="torch", capturable=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    """The loss forward + backward captured in a CUDA graph and replayed on new inputs equals an
    eager call on those inputs."""
    dev = torch.device("cuda")
    B, T, H, V = 4, 64, 256, 1000
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(B, T, H, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(V, H, device=dev, dtype=torch.bfloat16, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, V, (B, T), device=dev, generator=g)
    adv = torch.randn(B, device=dev, generator=g)
    old = -torch.rand(B, T, device=dev, generator=g)

    def step():
        h.grad = None
        w.grad = None
        out = unified_policy_loss(h, w, t, config="grpo", advantages=adv, old_logprobs=old,
                                  capturable=True)
        out.loss.backward()
        return out.loss, out.metrics["clip_frac"]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):                 # warm-up: compile the kernels, pick the GEMM forms
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_g, clip_g = step()
        dh_g, dw_g = h.grad, w.grad
    with torch.no_grad():
        h.copy_(torch.randn_like(h))
        adv.copy_(torch.randn_like(adv))
    graph.replay()
    torch.cuda.synchronize()
    loss_e, clip_e = step()
    assert torch.allclose(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    assert torch.allclose(clip_g, clip_e)
    assert torch.allclose(dh_g.float(), h.grad.float(), rtol=2e-2, atol=1e-5)
    assert torch.allclose(dw_g.float(), w.grad.float(), rtol=2e-2, atol=1e-5)
