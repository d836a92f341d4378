"""Autocast with a float32 lm_head weight: the weight is never cast whole.

Under ``torch.autocast(dtype=bf16)`` a float32 weight goes into the kernels as it is; the Triton kernels
cast each W tile in registers and every host GEMM casts one slab ``W[v0:v1]`` at a time
(``kernels/workspace.py: WeightSlabs``, bounded by ``UPG_KERNELS_CAST_SLAB_BYTES``). Checked here:

* values and gradients against float64 (of the bf16-rounded inputs: what autocast computes), odd V,
  N=1, ignore_index rows, a bias, for every backend (Triton under the interpreter), the GEMM-tiled
  forward, ``unified_policy_loss`` on the two-pass and one-pass paths; the weight's gradient is float32;
* bitwise equality with casting the whole weight first (the former behaviour) where the order of the
  operations is the same (the forward values; dW up to its final rounding);
* a spy on every aten op's outputs that fails if a bf16 tensor of ``V·H`` elements is ever made (and
  a check that the spy sees such a copy when the weight is cast whole);
* the memory at llama3-8b on ``meta`` (which has no autocast: the compute dtype is set the way autocast
  sets it): the peak drops by the ``2·V·H`` bytes of the copy, and no bf16 ``[V, H]`` tensor exists.
"""
from contextlib import nullcontext

import pytest
import torch
from torch.utils._pytree import tree_flatten

import upg_kernels.logprobs as logprobs_mod
from bench.memtrace import AllocTracer
from upg_kernels import LossConfig, token_logprobs, unified_policy_loss
from upg_kernels import settings
from upg_kernels.kernels import workspace
from upg_kernels.reference import token_logprobs_reference

N, H, V = 7, 24, 203        # V odd: no multiple of any tile
SLAB_ROWS = 20              # cast slab rows at H=24 in bf16 (a tenth of V)
BF16 = torch.bfloat16


class Spy(AllocTracer):
    """The allocation tracer (custom ops entered) that also records ``(op, dtype, numel)`` of every
    tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.made = []
        self.origin = {}          # storage -> dtype of the tensor that allocated it

    def _track(self, out, op_name, inputs):
        seen = {t.untyped_storage()._cdata for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            key = t.untyped_storage()._cdata
            if key not in self._storages and key not in seen:        # a new allocation
                self.origin[key] = t.dtype
        super()._track(out, op_name, inputs)
        # a bf16 view of a float32 allocation (the one-pass path's dz written over its logits) is
        # not a bf16 tensor that was made: it is recorded with its allocation's dtype
        self.made += [(op_name, self.origin.get(t.untyped_storage()._cdata, t.dtype), tuple(t.shape))
                      for t in outs]

    def narrow(self, Vv=V, Hh=H):
        """The bf16 tensors of at least ``Vv·Hh`` elements with an ``Hh``-sized dimension (a weight
        copy, whole or a view's base; not a ``[rows, V]`` logits-gradient block) that were made."""
        return [m for m in self.made if m[1] == BF16 and Hh in m[2] and _numel(m[2]) >= Vv * Hh]

    def largest_weight_slab(self, Hh=H):
        """Rows of the largest bf16 ``[rows, Hh]`` tensor made."""
        return max((m[2][0] for m in self.made if m[1] == BF16 and len(m[2]) == 2 and m[2][1] == Hh),
                   default=0)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.fixture
def small_slabs(monkeypatch):
    monkeypatch.setenv(settings.CAST_SLAB_BYTES.name, str(SLAB_ROWS * H * 2))


def _inputs(n=N, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    w = torch.randn(V, H, generator=g) * H ** -0.5 * 2
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    if n > 2:
        t[1] = -100
        t[n - 1] = V - 1         # the last column (a partial tile)
    return h, w, b, t


def _logprobs_run(h, w, b, t, *, backend, whole_cast=False, spy=None, path=None):
    """logp, entropy and the three gradients under bf16 autocast; ``whole_cast``: the weight (and
    bias) cast to bf16 by the caller first (the former behaviour)."""
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    with spy if spy is not None else nullcontext():
        with torch.autocast("cpu", dtype=BF16):
            wa, ba = (ww.to(BF16), None if bb is None else bb.to(BF16)) if whole_cast else (ww, bb)
            lp, ent = token_logprobs(hh, wa, t, bias=ba, backend=backend, return_entropy=True,
                                     temperature=0.9, path=path)
        g = torch.linspace(-1, 1, lp.numel())
        ((lp * g).sum() + 0.3 * ent.sum()).backward()
    return lp.detach(), ent.detach(), hh.grad, ww.grad, None if bb is None else bb.grad


def _reference(h, w, b, t):
    """float64 values and gradients of the bf16-rounded inputs (what autocast computes)."""
    h64 = h.to(BF16).double().requires_grad_(True)
    w64 = w.to(BF16).double().requires_grad_(True)
    b64 = None if b is None else b.to(BF16).double().requires_grad_(True)
    lp, ent = token_logprobs_reference(h64, w64, t, bias=b64, temperature=0.9, return_entropy=True)
    g = torch.linspace(-1, 1, lp.numel(), dtype=torch.float64)
    ((lp * g).sum() + 0.3 * ent.sum()).backward()
    return lp.detach(), ent.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def _rel(a, r):
    return float((a.double() - r.double()).abs().max() / r.double().abs().max().clamp(min=1e-30))


LOGPROB_CASES = [("torch", None), ("triton", None), ("triton", "two_pass_gemm_forward"),
                 ("triton_atomic", None)]


@pytest.mark.parametrize("n", [N, 1])
@pytest.mark.parametrize("backend,path", LOGPROB_CASES)
def test_token_logprobs_float32_weight_under_autocast(backend, path, n, small_slabs):
    h, w, b, t = _inputs(n)
    spy = Spy()
    lp, ent, dh, dw, db = _logprobs_run(h, w, b, t, backend=backend, spy=spy, path=path)
    assert not spy.narrow(), f"a bf16 copy of the whole weight was made: {spy.narrow()}"
    assert spy.largest_weight_slab() <= max(SLAB_ROWS, 32, n)   # a cast slab (<= a tile), hidden
    assert dw.dtype == torch.float32 and db.dtype == torch.float32 and dh.dtype == torch.float32

    # float64 of the bf16-rounded inputs: logits rounded to bf16 by the torch backend's CPU GEMM
    r = _reference(h, w, b, t)
    valid = t != -100
    tol = 3e-2 if backend == "torch" else 1e-4
    assert torch.allclose(lp.double(), r[0], atol=tol) and torch.allclose(ent.double(), r[1], atol=tol)
    assert torch.all(lp[~valid] == 0) and torch.all(dh[~valid] == 0)
    for a, ref in zip((dh, dw, db), r[2:]):
        assert _rel(a, ref) <= 2e-2                # bf16 tolerance (docs/kernels.md §2a)

    # the former behaviour (the whole weight cast first): the same forward bit for bit (the GEMM-tiled
    # forward: to float32 rounding, its logits slabs shrink to the cast slab), dW the same up to its
    # final rounding to bf16, dh to float32 summation order (slab by slab)
    old = _logprobs_run(h, w, b, t, backend=backend, whole_cast=True, path=path)
    if path is None:
        assert torch.equal(lp, old[0]) and torch.equal(ent, old[1])
    else:
        assert torch.allclose(lp, old[0], atol=1e-5) and torch.allclose(ent, old[1], atol=1e-5)
    assert torch.equal(dw.to(BF16).float(), old[3])
    assert _rel(dh, old[2]) <= 1e-5
    assert torch.equal(db, old[4])


def test_the_spy_sees_a_whole_weight_cast(monkeypatch, small_slabs):
    """The check above can fail: with the op entry casting W whole (the former behaviour), the spy
    records the bf16 [V, H] copy."""
    monkeypatch.setattr(logprobs_mod, "keeps_weight", lambda *a: False)
    h, w, b, t = _inputs()
    spy = Spy()
    _logprobs_run(h, w, b, t, backend="torch", spy=spy)
    assert spy.narrow()


def test_weight_slabs_bound_and_values(small_slabs):
    w = torch.randn(V, H)
    slabs = workspace.WeightSlabs(w, BF16)
    assert slabs.cast and slabs.rows == SLAB_ROWS and slabs.nbytes == SLAB_ROWS * H * 2
    bounds = slabs.bounds()
    assert bounds[0] == (0, SLAB_ROWS) and bounds[-1][1] == V
    for v0, v1 in bounds:
        assert torch.equal(slabs(v0, v1), w[v0:v1].to(BF16))
    same = workspace.WeightSlabs(w, torch.float32)
    assert not same.cast and same.buf is None and same(3, 9).data_ptr() == w[3:9].data_ptr()
    with pytest.raises(ValueError, match="exceeds the cast buffer"):
        slabs(0, SLAB_ROWS + 1)
    assert workspace.keeps_weight(torch.float32, BF16) and workspace.keeps_weight(torch.float32, torch.float16)
    assert not workspace.keeps_weight(BF16, torch.float32) and not workspace.keeps_weight(torch.float64, BF16)


# ----------------------------------------------------------------------------- the loss
B, T = 4, 5


def _loss_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * H ** -0.5 * 2
    b = torch.randn(V, generator=g) * 0.3
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 2] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    cfg = LossConfig.preset("grpo", entropy_coef=0.01)
    return cfg, h, w, b, t, dict(loss_mask=mask, advantages=adv)


def _loss_run(cfg, h, w, b, t, kw, *, backend, path, autocast=True, spy=None):
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True)
    with spy if spy is not None else nullcontext():
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = unified_policy_loss(hh, ww, t, config=cfg, bias=bb, backend=backend, path=path, **kw)
        (1.3 * out.loss).backward()
    return out.loss.detach(), hh.grad, ww.grad, bb.grad


@pytest.mark.parametrize("path", ["two_pass", "one_pass"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unified_policy_loss_float32_weight_under_autocast(backend, path, small_slabs):
    cfg, h, w, b, t, kw = _loss_case()
    spy = Spy()
    loss, dh, dw, db = _loss_run(cfg, h, w, b, t, kw, backend=backend, path=path, spy=spy)
    assert not spy.narrow(), f"a bf16 copy of the whole weight was made: {spy.narrow()}"
    assert spy.largest_weight_slab() <= max(SLAB_ROWS, 32, B * T)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    # float64 of the bf16-rounded inputs
    r = _loss_run(cfg, h.to(BF16).double(), w.to(BF16).double(), b.to(BF16).double(), t, kw,
                  backend="torch", path="two_pass", autocast=False)
    tol = 3e-2 if backend == "torch" else 1e-4
    assert abs(loss.item() - r[0].item()) <= tol * max(1.0, abs(r[0].item()))
    for a, ref in zip((dh, dw, db), r[1:]):
        assert _rel(a, ref) <= 2e-2


# ----------------------------------------------------------------------------- meta, llama3-8b
LLAMA_H, LLAMA_V, LLAMA_N = 4096, 128256, 8192


def _meta_peak(monkeypatch, fn, whole_cast):
    """``(peak bytes, peak extra bytes, spy)`` of ``fn(hidden, weight, targets)`` + backward on meta at
    llama3-8b (the peak of everything allocated after the inputs; the extra: less the two gradients), computing in bf16 as autocast would (meta has no autocast) with a
    float32 weight; ``whole_cast``: the op entry casts W whole (the former behaviour)."""
    from bench.memory_model import gpu_planning
    monkeypatch.setattr(logprobs_mod, "_common_dtype", lambda *a: BF16)
    if whole_cast:
        monkeypatch.setattr(logprobs_mod, "keeps_weight", lambda *a: False)
    else:
        monkeypatch.setattr(logprobs_mod, "keeps_weight", workspace.keeps_weight)
    h = torch.empty(LLAMA_N, LLAMA_H, device="meta", dtype=BF16, requires_grad=True)
    w = torch.empty(LLAMA_V, LLAMA_H, device="meta", dtype=torch.float32, requires_grad=True)
    t = torch.empty(LLAMA_N, device="meta", dtype=torch.int64)
    with gpu_planning(), Spy() as spy:
        fn(h, w, t).backward()
        grads = h.grad.untyped_storage().nbytes() + w.grad.untyped_storage().nbytes()
    assert w.grad.dtype == torch.float32
    return spy.peak, spy.peak - grads, spy


def _grpo(path):
    cfg = LossConfig.preset("grpo", kl_coef=0.0, entropy_coef=0.0)

    def fn(h, w, t):
        B, T = 8, LLAMA_N // 8
        kw = dict(loss_mask=torch.empty(B, T, device="meta", dtype=torch.float32),
                  advantages=torch.empty(B, device="meta"),
                  old_logprobs=torch.empty(B, T, device="meta"))
        return unified_policy_loss(h.reshape(B, T, -1), w, t.reshape(B, T), config=cfg, backend="triton",
                                   path=path, **kw).loss
    return fn


META_CASES = {
    "token_logprobs": lambda h, w, t: token_logprobs(h, w, t, backend="triton", path="two_pass").sum(),
    "token_logprobs_gemm_forward": lambda h, w, t: token_logprobs(
        h, w, t, backend="triton", path="two_pass_gemm_forward").sum(),
    "grpo_two_pass": _grpo("two_pass"),
    "grpo_one_pass": _grpo("one_pass"),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_llama3_8b_no_whole_weight_copy(case, monkeypatch):
    """At llama3-8b (H=4096, V=128256, N=8192) the former whole cast held the 2·V·H = 1.05 GB copy
    (and a bf16 dW of that size before autograd cast it to float32); now no bf16 [V, H] tensor exists,
    the peak is about the copy lower, and what the call holds beyond its inputs and gradients stays
    within the paths' workspaces plus the cast slab (``UPG_KERNELS_CAST_SLAB_BYTES``, 32 MiB)."""
    fn = META_CASES[case]
    new, new_extra, spy = _meta_peak(monkeypatch, fn, whole_cast=False)
    old, _old_extra, old_spy = _meta_peak(monkeypatch, fn, whole_cast=True)
    copy = 2 * LLAMA_V * LLAMA_H
    assert old_spy.narrow(LLAMA_V, LLAMA_H)                 # the former copy, seen
    assert not spy.narrow(LLAMA_V, LLAMA_H)
    slab = settings.CAST_SLAB_BYTES.get()
    if case.endswith("one_pass"):
        # one budget (UPG_KERNELS_ONE_PASS_BYTES) holds the one-pass path's dW state, its cast slab
        # and its chunks: with the float32 weight kept, dW accumulates in the float32 gradient (no
        # accumulator) and the chunks take the room, so the peak stays within the budget where the
        # former cast added the copy (and a float32 accumulator) on top of its chunks
        assert new_extra <= settings.ONE_PASS_BYTES.get() + 2 * LLAMA_N * LLAMA_H, new_extra
        assert old >= copy + 4 * LLAMA_V * LLAMA_H, old          # the copy and the accumulator
        return
    # the former peak had the copy on top of the gradients but no workspace (GRPO two-pass: 3.00 ->
    # 2.08 GiB)
    assert old - new >= copy - settings.WORKSPACE_BYTES.get(), (new, old)
    budget = settings.WORKSPACE_BYTES.get()
    assert new_extra <= 1.1 * budget + slab + 2 * LLAMA_N * LLAMA_H, new_extra   # + a bf16 [N, H]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_autocast_matches_the_whole_cast(backend, small_slabs):
    """fp16 autocast: the same forward as casting the whole weight, no fp16 [V, H] copy."""
    h, w, b, t = _inputs()
    spy = Spy()
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with spy, torch.autocast("cpu", dtype=torch.float16):
        lp = token_logprobs(hh, ww, t, bias=b, backend=backend)
    lp.sum().backward()
    assert not [m for m in spy.made if m[1] == torch.float16 and H in m[2] and _numel(m[2]) >= V * H]
    assert ww.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):
        old = token_logprobs(h, w.to(torch.float16), t, bias=b, backend=backend)
    assert torch.equal(lp.detach(), old)
