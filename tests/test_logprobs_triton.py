"""token_logprobs backends ("triton" under the interpreter on CPU, and "torch") against the float64
reference, at odd sizes; row skipping, NaN isolation, tile filtering and its bound; a proof that no
N x V tensor is created; GPU tests (bf16, realistic sizes) under the ``gpu`` marker."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from upg_kernels import token_logprobs, token_logprobs_reference
from upg_kernels.kernels import LogprobParams, get_backend

BACKENDS = ["triton", "triton_atomic", "torch"]
TOL = 1e-5
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(got, ref):
    """max |got - ref| / max |ref| (absolute when the reference is all zeros)."""
    got = got.detach().double()
    ref = ref.detach().double()
    if ref.numel() == 0:
        return 0.0
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() \
        if ref.abs().max() > 0 else got.abs().max().item()


def _inputs(N, H, V, *, bias=False, ignore_every=0, seed=0, lead=None, wscale=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * wscale
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    if lead is not None:
        h = h.reshape(*lead, H)
        t = t.reshape(lead)
    return h, w, b, t


def _compare(N, H, V, backend, *, bias=False, temperature=1.0, softcap=None, ignore_every=0,
             return_entropy=True, grad="both", lead=None, seed=0, filter_eps=0.0):
    """Run ours on float32 inputs and the reference in float64 on the same (rounded) inputs;
    return the max relative errors of every output and gradient."""
    h, w, b, t = _inputs(N, H, V, bias=bias, ignore_every=ignore_every, seed=seed, lead=lead)
    gen = torch.Generator().manual_seed(seed + 1)
    gl = torch.randn(t.shape, generator=gen)
    ge = torch.randn(t.shape, generator=gen)

    def run(hh, ww, bb, fn, **kw):
        hh = hh.clone().requires_grad_()
        ww = ww.clone().requires_grad_()
        bb = None if bb is None else bb.clone().requires_grad_()
        out = fn(hh, ww, t, bias=bb, temperature=temperature, softcap=softcap,
                 return_entropy=return_entropy, **kw)
        lp, en = out if return_entropy else (out, None)
        loss = 0
        if grad in ("logp", "both"):
            loss = loss + (lp * gl.to(lp.dtype)).sum()
        if grad in ("ent", "both") and en is not None:
            loss = loss + (en * ge.to(en.dtype)).sum()
        loss.backward()
        return lp, en, hh.grad, ww.grad, (None if bb is None else bb.grad)

    ours = run(h.to(DEV), w.to(DEV), None if b is None else b.to(DEV), token_logprobs,
               backend=backend, filter_eps=filter_eps)
    ref = run(h.double(), w.double(), None if b is None else b.double(), token_logprobs_reference)
    names = ("logp", "entropy", "dhidden", "dweight", "dbias")
    errs = {}
    for name, a, r in zip(names, ours, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape, name
        if name in ("logp", "entropy"):
            assert a.dtype == torch.float32
        errs[name] = _rel(a.cpu(), r)
    return errs


def _assert_close(errs, tol=TOL):
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


# ----------------------------------------------------------------------------- odd sizes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,H,V", [(1, 16, 1), (1, 32, 37), (7, 16, 37), (40, 48, 1003),
                                   (33, 64, 130)])
def test_shapes(backend, N, H, V):
    _assert_close(_compare(N, H, V, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_temperature_ignored(backend):
    _assert_close(_compare(40, 48, 1003, backend, bias=True, temperature=0.7, ignore_every=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_masks_part_of_the_vocabulary(backend):
    """A -inf bias (vocabulary entries masked out, e.g. padding rows of the lm_head) gives the
    distribution over the rest: finite log-probs, entropy and gradients, equal to the reference.
    Whole vocabulary tiles and splits are -inf here, which the online max and the combine must handle."""
    N, H, V = 9, 16, 300
    h, w, _, t = _inputs(N, H, V)
    b = torch.zeros(V)
    b[150:] = float("-inf")
    t = t % 150
    gl, ge = torch.randn(N), torch.randn(N)

    def run(dtype, fn, **kw):
        hh, ww = (x.to(dtype).clone().requires_grad_() for x in (h, w))
        lp, en = fn(hh, ww, t, bias=b.to(dtype), return_entropy=True, **kw)
        (lp * gl.to(dtype) + en * ge.to(dtype)).sum().backward()
        return lp, en, hh.grad, ww.grad

    ours = run(torch.float32, token_logprobs, backend=backend)
    ref = run(torch.float64, token_logprobs_reference)
    for a, r in zip(ours, ref):
        assert torch.isfinite(a).all()
        assert (a.double() - r).abs().max() <= TOL * r.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap(backend):
    _assert_close(_compare(33, 64, 517, backend, bias=True, softcap=5.0, temperature=1.3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["logp", "ent", "both"])
def test_gradient_paths(backend, grad):
    errs = _compare(24, 32, 300, backend, grad=grad, bias=True, ignore_every=5)
    _assert_close(errs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_entropy_output(backend):
    _assert_close(_compare(20, 32, 211, backend, return_entropy=False, ignore_every=4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab(backend):
    # V > 20000 and not a multiple of any block (20011 is prime): the one big case
    _assert_close(_compare(6, 32, 20011, backend, bias=True))


def test_weight_gradient_slabs(monkeypatch):
    """The backward's vocabulary slabs (float32: views of the output; see the bf16 test for the
    float32 buffer path): several slabs, the last one partial."""
    monkeypatch.setenv("UPG_KERNELS_TRITON_DW_SLAB_BYTES", str(4 * 48 * 128))
    _assert_close(_compare(21, 48, 1003, "triton_atomic", bias=True, ignore_every=4))


def test_split_heuristic(monkeypatch):
    from upg_kernels.kernels import triton_logprobs_fwd as fwd
    monkeypatch.setattr(fwd, "interpreting", lambda: False)
    for n_blocks, v_tiles in [(1, 1), (1, 3), (4, 1002), (64, 1002), (256, 1002), (2000, 1002),
                              (3, 40)]:
        s = fwd._num_splits(n_blocks, v_tiles, 132)
        assert 1 <= s <= max(1, v_tiles // 4)
        if v_tiles // 4 * n_blocks >= 132:      # enough work: at least one full wave
            assert n_blocks * s >= 132
    assert fwd._num_splits(64, 1002, 132) * 64 % 132 > 100   # >= 97% wave efficiency


def test_config_env_override(monkeypatch):
    from upg_kernels.kernels import triton_logprobs_common as common
    monkeypatch.setattr(common, "interpreting", lambda: False)
    assert common.fwd_config(torch.bfloat16) == common._FWD_GPU
    assert common.bwd_config(torch.float32) == common._BWD_GPU_F32
    monkeypatch.setenv("UPG_KERNELS_TRITON_FWD_CONFIG", "64,256,64,8,3")
    assert common.fwd_config(torch.bfloat16) == common.BlockConfig(64, 256, 64, 8, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_time_shape(backend):
    _assert_close(_compare(2 * 9, 32, 101, backend, lead=(2, 9), ignore_every=4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    h, w, b, t = _inputs(9, 16, 50, bias=True)
    t[:] = -100
    h.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    lp, en = token_logprobs(h, w, t, bias=b, return_entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros(9)) and torch.equal(en, torch.zeros(9))
    (lp.sum() + en.sum()).backward()
    for x in (h, w, b):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------- skipping and NaN
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, on the NaN row, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_rows_skipped_and_nan_isolated(backend):
    N, H, V = 37, 32, 300
    h, w, b, t = _inputs(N, H, V, bias=True, ignore_every=7)
    nan_row = 4
    gl = torch.randn(N)
    ge = torch.randn(N)
    zero = torch.zeros(N, dtype=torch.bool)
    zero[::3] = True
    zero[nan_row] = True
    gl[zero] = 0
    ge[zero] = 0
    ge[1::4] = 0                       # some rows with only a logp gradient
    h_nan = h.clone()
    h_nan[nan_row] = float("nan")

    hh = h_nan.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    lp, en = token_logprobs(hh, ww, t, bias=bb, return_entropy=True, backend=backend)
    assert torch.isnan(lp[nan_row]) or t[nan_row] == -100
    others = torch.arange(N) != nan_row
    assert torch.isfinite(lp[others]).all() and torch.isfinite(en[others]).all()
    (lp * gl + en * ge).sum().backward()

    hd = h.double().requires_grad_()    # the reference on the clean rows (its NaN row has g = 0)
    wd = w.double().requires_grad_()
    bd = b.double().requires_grad_()
    rl, re = token_logprobs_reference(hd, wd, t, bias=bd, return_entropy=True)
    (rl * gl.double() + re * ge.double()).sum().backward()

    assert _rel(lp[others], rl[others]) <= TOL and _rel(en[others], re[others]) <= TOL
    for got, ref in ((ww.grad, wd.grad), (bb.grad, bd.grad)):
        assert torch.isfinite(got).all()
        assert _rel(got, ref) <= TOL
    assert torch.isfinite(hh.grad).all()
    assert _rel(hh.grad, hd.grad) <= TOL
    # skipped rows get exactly nothing
    skipped = zero | (t == -100)
    assert torch.equal(hh.grad[skipped], torch.zeros_like(hh.grad[skipped]))


def test_skipping_launches_only_active_rows(monkeypatch):
    """The triton backward sees only the active rows (compaction happens on the host)."""
    from upg_kernels.kernels import triton_logprobs_bwd as bwd
    seen = {}
    real = bwd._bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen["M"] = args[13]
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(bwd, "_bwd_kernel", Spy())
    N, H, V = 20, 16, 40
    h, w, _, t = _inputs(N, H, V)
    t[0] = -100
    fwd = get_backend("triton_atomic").forward
    p = LogprobParams()
    lp, en, lse = fwd(h, w, None, t, p)
    gl = torch.zeros(N)
    gl[[0, 3, 5]] = 1.0                # row 0 is ignored: 2 active rows
    ge = torch.zeros(N)
    ge[7] = 1.0
    get_backend("triton_atomic").backward(h, w, None, t, lse, en, gl, ge, p, True, True, False)
    assert seen["M"] == 3


# ----------------------------------------------------------------------------- tile filtering
def test_filter_eps_is_relative_to_the_row_coefficient():
    """A token-mean loss over many tokens has g = 1/N, far below eps: a relative filter keeps the
    target column (|1 - p| > eps) and so the gradient; an absolute one would have skipped everything."""
    N, H, V = 4500, 16, 64
    h, w, _, t = _inputs(N, H, V)
    eps = float(torch.finfo(torch.bfloat16).eps) / 32     # CCE's "high"
    grads = []
    for fe in (0.0, eps):
        hh = h.clone().requires_grad_()
        token_logprobs(hh, w, t, backend="triton", filter_eps=fe).mean().backward()
        grads.append(hh.grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-9)


def test_filter_eps_within_documented_bound():
    """docs/kernels.md: every skipped logit-gradient element has |dz_ij| <= eps * c_i with
    c_i = |g_logp_i| + |g_ent_i| (T = 1), so |ddW[j,k]| <= eps * sum_i c_i |h[i,k]|,
    |ddh[i,k]| <= eps * c_i * sum_j |W[j,k]|, |ddb[j]| <= eps * sum_i c_i, on top of the unfiltered
    rounding error."""
    N, H, V = 32, 32, 640
    h, w, b, t = _inputs(N, H, V, bias=True)
    b[200:] -= 12.0            # a tail of unlikely tokens: their tiles have |dz| < eps
    t = t % 200
    gl = torch.randn(N)
    ge = torch.randn(N) * 0.1
    eps = 1e-4

    def grads(dtype=torch.float32, fn=token_logprobs, **kw):
        hh, ww, bb = (x.detach().clone().to(dtype).requires_grad_() for x in (h, w, b))
        lp, en = fn(hh, ww, t, bias=bb, return_entropy=True, **kw)
        (lp * gl.to(dtype) + en * ge.to(dtype)).sum().backward()
        return hh.grad, ww.grad, bb.grad

    exact = grads(backend="triton")
    filt = grads(backend="triton", filter_eps=eps)
    ref = grads(torch.float64, token_logprobs_reference)
    assert any(not torch.equal(a, c) for a, c in zip(exact, filt)), "nothing was filtered"
    c = (gl.abs() + ge.abs()).double()           # the row coefficient (T = 1)
    bounds = (eps * c[:, None] * w.double().abs().sum(0)[None, :],
              eps * (c[:, None] * h.double().abs()).sum(0).expand(V, H),
              torch.full((V,), eps * float(c.sum()), dtype=torch.float64))
    for got, r, bound in zip(filt, ref, bounds):
        slack = TOL * r.abs().max()
        assert ((got.double() - r).abs() <= bound + slack).all()


# ----------------------------------------------------------------------------- property test
@settings(max_examples=8, deadline=None)
@given(N=st.integers(1, 40), H=st.sampled_from([16, 24, 48]), V=st.integers(1, 300),
       bias=st.booleans(), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       ignore_every=st.sampled_from([0, 2, 5]), seed=st.integers(0, 1000))
def test_property_triton(N, H, V, bias, temperature, ignore_every, seed):
    _assert_close(_compare(N, H, V, "triton", bias=bias, temperature=temperature,
                           ignore_every=ignore_every, seed=seed))


# ----------------------------------------------------------------------------- no N x V tensor
class _NumelRecorder(TorchDispatchMode):
    """Largest tensor any allocating op returns (in-place ops and views allocate nothing; the
    Triton interpreter's own argument copies are such set_/copy_ calls)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_vocab_sized_tensor(backend, monkeypatch):
    N, H, V = 64, 16, 500
    # torch backend: chunks of 8 rows (< N)
    monkeypatch.setenv("UPG_KERNELS_TORCH_CHUNK_BYTES", str(4 * V * 8))
    # triton (GEMM backward): a workspace of 16 x 64 float32 dz plus 16 rows of dh / h
    monkeypatch.setenv("UPG_KERNELS_WORKSPACE_BYTES", str(4 * 16 * 64 + 16 * 8 * H))
    h, w, b, t = _inputs(N, H, V, bias=True, ignore_every=9)
    be = get_backend(backend)
    p = LogprobParams()
    gl = torch.randn(N)
    ge = torch.randn(N)
    rec = _NumelRecorder()
    with rec:
        lp, en, lse = be.forward(h, w, b, t, p)
        dh, dw, db = be.backward(h, w, b, t, lse, en, gl, ge, p, True, True, True)
    assert rec.max_numel > 0
    assert rec.max_numel < N * V
    if backend.startswith("triton"):   # nothing bigger than an input or a gradient
        assert rec.max_numel <= max(N * H, V * H)
    else:
        assert rec.max_numel <= max(N * H, V * H, 8 * V)
    ref = token_logprobs_reference(h.double(), w.double(), t, bias=b.double())
    assert _rel(lp, ref) <= TOL


# ----------------------------------------------------------------------------- dtypes and errors
def test_bf16_triton_loose(monkeypatch):
    monkeypatch.setenv("UPG_KERNELS_TRITON_DW_SLAB_BYTES", str(4 * 64 * 128))   # 3 slabs
    N, H, V = 24, 64, 300
    h, w, b, t = _inputs(N, H, V, bias=True, ignore_every=6)
    hb, wb, bb = (x.bfloat16().to(DEV).requires_grad_() for x in (h, w, b))
    lp, en = token_logprobs(hb, wb, t.to(DEV), bias=bb, return_entropy=True, backend="triton")
    assert lp.dtype == torch.float32 and en.dtype == torch.float32
    gl = torch.randn(N)
    ge = torch.randn(N)
    (lp * gl.to(DEV) + en * ge.to(DEV)).sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    hd, wd, bd = (x.bfloat16().double().requires_grad_() for x in (h, w, b))
    rl, re = token_logprobs_reference(hd, wd, t, bias=bd, return_entropy=True)
    (rl * gl.double() + re * ge.double()).sum().backward()
    assert _rel(lp.cpu(), rl) <= 1e-5   # logits are exact products of bf16 inputs in fp32
    assert _rel(en.cpu(), re) <= 1e-4
    for got, ref in ((hb.grad, hd.grad), (wb.grad, wd.grad), (bb.grad, bd.grad)):
        assert _rel(got.cpu(), ref) <= 2e-2


def test_triton_rejects_float64():
    h, w, _, t = _inputs(4, 16, 20)
    with pytest.raises(TypeError, match="float64"):
        token_logprobs(h.double(), w.double(), t, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        get_backend("triton").forward(h.double(), w.double(), None, t, LogprobParams())
    with pytest.raises(TypeError, match="one dtype"):
        get_backend("triton").forward(h, w.bfloat16(), None, t, LogprobParams())


def test_empty_input_triton():
    h = torch.zeros(0, 16, requires_grad=True)
    w = torch.randn(20, 16)
    lp = token_logprobs(h, w, torch.zeros(0, dtype=torch.long), backend="triton")
    assert lp.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    h, w, b, t = _inputs(6, 16, 50, bias=True)

    def f(hh, ww, bb):
        lp, en = token_logprobs(hh, ww, t, bias=bb, return_entropy=True, backend=backend)
        return (lp + 0.1 * en).sum()

    args = [x.clone().requires_grad_() for x in (h, w, b)]
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    out.backward()
    args2 = [x.clone().requires_grad_() for x in (h, w, b)]
    f(*args2).backward()
    assert torch.allclose(out, f(*args2).detach(), rtol=1e-6, atol=1e-6)
    for a, c in zip(args, args2):
        assert torch.allclose(a.grad, c.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ GPU (bf16, real sizes)
def _materialized(h, w, t, return_entropy=True):
    """The TRL path: bf16 logits -> float32 -> log_softmax -> gather (and entropy)."""
    logits = (h @ w.T).float()
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    en = -(logp_all.exp() * logp_all).sum(-1)
    return lp, en


@pytest.mark.gpu
def test_gpu_bf16_error_not_worse_than_materialized():
    torch.manual_seed(0)
    N, H, V = 4096, 4096, 128256
    h = torch.randn(N, H, device="cuda").bfloat16()
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    gl = torch.randn(N, device="cuda")
    ge = torch.randn(N, device="cuda") * 0.1

    def grads(fn, **kw):
        hh = h.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        lp, en = fn(hh, ww, t, **kw)
        (lp * gl + en * ge).sum().backward()
        return [x.detach().double() for x in (lp, en, hh.grad, ww.grad)]

    ours = grads(token_logprobs, return_entropy=True, backend="triton")
    mat = grads(_materialized)
    # float64 reference in row chunks (N x V float64 is 1 GB per 1k rows)
    hd = h.double().requires_grad_()
    wd = w.double().requires_grad_()
    lps, ens = [], []
    for s in range(0, N, 512):
        lp, en = token_logprobs_reference(hd[s:s + 512], wd, t[s:s + 512], return_entropy=True)
        (lp * gl[s:s + 512].double() + en * ge[s:s + 512].double()).sum().backward()
        lps.append(lp.detach())
        ens.append(en.detach())
    ref = [torch.cat(lps), torch.cat(ens), hd.grad, wd.grad]
    for name, a, m, r in zip(("logp", "entropy", "dhidden", "dweight"), ours, mat, ref):
        err_ours = ((a - r).abs().max() / r.abs().max()).item()
        err_mat = ((m - r).abs().max() / r.abs().max()).item()
        assert err_ours <= err_mat * 1.05 + 1e-6, (name, err_ours, err_mat)


@pytest.mark.gpu
def test_gpu_peak_memory_one_percent():
    N, H, V = 8192, 4096, 128256
    h = torch.randn(N, H, device="cuda").bfloat16()
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")

    def peak_above(fn):
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        lp, en = fn(hh, ww)
        (lp.sum() + 0.1 * en.sum()).backward()
        torch.cuda.synchronize()
        grads = hh.grad.numel() * hh.grad.element_size() + ww.grad.numel() * ww.grad.element_size()
        peak = torch.cuda.max_memory_allocated() - base - grads
        del hh, ww, lp, en
        return peak

    ours = peak_above(lambda a, b: token_logprobs(a, b, t, return_entropy=True, backend="triton"))
    mat = peak_above(lambda a, b: _materialized(a, b, t))
    assert ours <= 0.01 * mat, (ours, mat)


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """N*H and V*H both past 2^31 elements: rows and vocabulary entries beyond the int32 range."""
    H = 4096
    N = 2**31 // H + 64
    V = 2**31 // H + 96
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(V, H, device="cuda", generator=g) * H ** -0.5).bfloat16()
    t = torch.full((N,), -100, device="cuda", dtype=torch.long)
    active = torch.cat([torch.arange(8, device="cuda"), torch.arange(N - 40, N, device="cuda")])
    t[active] = torch.randint(V - 3000, V, (active.numel(),), device="cuda", generator=g)
    gl = torch.zeros(N, device="cuda")
    gl[active] = torch.randn(active.numel(), device="cuda", generator=g)
    hh = h.requires_grad_()
    ww = w.requires_grad_()
    lp, en = token_logprobs(hh, ww, t, return_entropy=True, backend="triton")
    (lp * gl).sum().backward()

    # reference on the active rows: float32 products in vocabulary chunks, float64 softmax
    ha = h.detach()[active].float()
    z = torch.cat([ha @ w.detach()[s:s + 65536].float().T for s in range(0, V, 65536)], 1).double()
    logp_all = torch.log_softmax(z, -1)
    ta = t[active]
    rl = logp_all.gather(1, ta[:, None]).squeeze(1)
    re = -(logp_all.exp() * logp_all).sum(-1)
    assert _rel(lp[active], rl) <= 1e-4 and _rel(en[active], re) <= 1e-4
    dz = -gl[active].double()[:, None] * logp_all.exp()
    dz[torch.arange(active.numel()), ta] += gl[active].double()
    dzf = dz.float()
    dh_ref = sum(dzf[:, s:s + 65536] @ w.detach()[s:s + 65536].float() for s in range(0, V, 65536))
    assert _rel(hh.grad[active].float(), dh_ref) <= 2e-2
    tail = slice(V - 4096, V)                       # weight rows past 2^31 / H
    dw_ref = dzf[:, tail].T @ ha
    assert _rel(ww.grad[tail].float(), dw_ref) <= 2e-2
    assert torch.count_nonzero(hh.grad[8:N - 40]) == 0
