"""The GEMM backward (backend "triton": Triton dz blocks into a bounded workspace + GEMMs), on the CPU
under the interpreter: float64 reference at odd sizes with several token groups and vocabulary slabs,
bf16 dweight rounding per group vs one rounding, exact row skipping (work in proportion to the active
rows), bitwise determinism, the workspace bound, the lse gradient and the plan."""
from __future__ import annotations

import pytest
import torch

from upg_kernels import token_logprobs, token_logprobs_reference
from upg_kernels.kernels import LogprobParams, active_rows, gemm_backward, get_backend, triton_dz

from test_logprobs_triton import _inputs, _rel


@pytest.fixture
def budget():
    """Set the GEMM backward's workspace budget for one test."""
    def set_(n):
        gemm_backward.set_workspace_bytes(n)
    yield set_
    gemm_backward.set_workspace_bytes(None)


def _grads(backend, h, w, b, t, gl, ge, gs=None, dtype=torch.float32, **kw):
    hh = h.to(dtype).clone().requires_grad_()
    ww = w.to(dtype).clone().requires_grad_()
    bb = None if b is None else b.to(dtype).clone().requires_grad_()
    fn = token_logprobs_reference if backend == "ref" else token_logprobs
    extra = {} if backend == "ref" else dict(backend=backend)
    if gs is not None and backend != "ref":
        lp, en, ls = fn(hh, ww, t, bias=bb, return_entropy=True, return_lse=True, **extra, **kw)
    else:
        lp, en = fn(hh, ww, t, bias=bb, return_entropy=True, **extra, **kw)
        ls = None
    loss = (lp * gl.to(lp.dtype)).sum() + (en * ge.to(en.dtype)).sum()
    if gs is not None:
        if ls is None:   # reference: lse = logp-free log-sum-exp of the same logits
            z = hh @ ww.T + (0 if bb is None else bb)
            if kw.get("softcap"):
                z = kw["softcap"] * torch.tanh(z / kw["softcap"])
            z = z / kw.get("temperature", 1.0)
            ls = torch.where(t != -100, torch.logsumexp(z, -1), torch.zeros_like(lp))
        loss = loss + (ls * gs.to(ls.dtype)).sum()
    loss.backward()
    return [x for x in (lp, en, ls, hh.grad, ww.grad, None if bb is None else bb.grad) if x is not None]


@pytest.mark.parametrize("N,H,V,n_budget", [(1, 16, 37, None), (37, 48, 203, 3000),
                                            (70, 40, 517, 9000), (33, 64, 1003, None)])
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, temperature=0.7),
                                  dict(bias=True, softcap=3.0)])
def test_matches_float64_with_groups_and_slabs(budget, N, H, V, n_budget, opts):
    """Odd sizes (V not a multiple of a tile, V > slab, several token groups), ignored rows, bias,
    temperature, softcap; the lse gradient too."""
    budget(n_budget)
    opts = dict(opts)
    h, w, b, t = _inputs(N, H, V, bias=opts.pop("bias", False), ignore_every=5, seed=N)
    g = torch.Generator().manual_seed(V)
    gl, ge, gs = (torch.randn(N, generator=g) for _ in range(3))
    ours = _grads("triton", h, w, b, t, gl, ge, gs, **opts)
    ref = _grads("ref", h.double(), w.double(), None if b is None else b.double(), t, gl, ge, gs, **opts)
    for a, r in zip(ours, ref):
        assert _rel(a, r) <= 2e-6, (_rel(a, r), a.shape)
    if n_budget:
        pl = gemm_backward.plan(int((t != -100).sum()), H, V, torch.float32)
        assert pl.n_groups(int((t != -100).sum())) > 1 and pl.slab_cols < V


def test_bf16_dweight_rounding_per_group_vs_once(budget):
    """bf16: dW accumulated in bf16 over several token groups stays within 2x the error of a single
    rounding (fp32 accumulator granted by a larger budget); both are measured against float64."""
    N, H, V = 96, 64, 300
    h, w, b, t = _inputs(N, H, V, bias=True, seed=3)
    g = torch.Generator().manual_seed(4)
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)
    hb, wb, bb = h.bfloat16(), w.bfloat16(), b.bfloat16()
    ref = _grads("ref", hb.double(), wb.double(), bb.double(), t, gl, ge)
    budget(2 * 16 * 64 + 16 * 6 * H)            # 16-row groups: 6 roundings of dW
    pl = gemm_backward.plan(N, H, V, torch.bfloat16)
    assert not pl.dw_fp32 and pl.n_groups(N) == 6
    many = _grads("triton", hb, wb, bb, t, gl, ge, dtype=torch.bfloat16)
    budget(4 * V * H + 2 * 16 * 64 + 16 * 6 * H)  # the same groups plus a float32 dW accumulator
    assert gemm_backward.plan(N, H, V, torch.bfloat16).dw_fp32
    once = _grads("triton", hb, wb, bb, t, gl, ge, dtype=torch.bfloat16)
    e_many, e_once = _rel(many[3], ref[3]), _rel(once[3], ref[3])
    assert e_once <= 8e-3 and e_many <= max(2 * e_once, 8e-3), (e_many, e_once)
    assert _rel(many[2], ref[2]) <= 8e-3           # dhidden: fp32 accumulation, one rounding
    assert many[2].dtype == torch.bfloat16 and many[3].dtype == torch.bfloat16


def test_bitwise_deterministic(budget):
    budget(4 * 16 * 64 + 16 * 8 * 48)
    h, w, b, t = _inputs(45, 48, 300, bias=True, ignore_every=4, seed=9)
    g = torch.Generator().manual_seed(1)
    gl, ge = torch.randn(45, generator=g), torch.randn(45, generator=g)
    a = _grads("triton", h, w, b, t, gl, ge)
    c = _grads("triton", h, w, b, t, gl, ge)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_work_in_proportion_to_active_rows(monkeypatch, budget):
    """Rows with zero coefficients are compacted away: with half the rows at zero the dz kernel
    computes half the rows (and the GEMMs run on the compacted groups)."""
    budget(4 * 16 * 64 + 16 * 8 * 16)
    seen = []
    real = triton_dz._dz_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append(args[11])    # G: rows of this token group
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(triton_dz, "_dz_kernel", Spy())
    N, H, V = 64, 16, 130
    h, w, _, t = _inputs(N, H, V, seed=2)
    be = get_backend("triton")
    p = LogprobParams()
    lp, en, lse = be.forward(h, w, None, t, p)
    dense = torch.randn(N)
    half = dense.clone()
    half[N // 2:] = 0.0                          # e.g. GRPO groups with equal rewards
    be.backward(h, w, None, t, lse, en, dense, None, p, True, True, False)
    rows_dense = sum(seen)
    seen.clear()
    dh, dw, _ = be.backward(h, w, None, t, lse, en, half, None, p, True, True, False)
    assert sum(seen) * 2 == rows_dense
    assert torch.equal(dh[N // 2:], torch.zeros_like(dh[N // 2:]))
    ref = get_backend("torch").backward(h, w, None, t, lse, en, half, None, p, True, True, False)
    assert _rel(dh, ref[0]) < 1e-6 and _rel(dw, ref[1]) < 1e-6


def test_active_rows():
    t = torch.tensor([0, 1, -100, 2, 3])
    gl = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
    ge = torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0])
    rows, gl2, ge2, gs2 = active_rows(t, gl, ge, torch.zeros(5), -100)
    assert rows.tolist() == [1, 3] and gs2 is None and ge2 is not None
    rows, _, ge2, _ = active_rows(t, gl, torch.zeros(5), None, -100)
    assert rows.tolist() == [1] and ge2 is None


def test_plan_within_budget_and_shapes():
    for (M, H, V, dt) in [(8192, 4096, 128256, torch.bfloat16), (32768, 3584, 152064, torch.bfloat16),
                          (8192, 2304, 256000, torch.float32), (5, 896, 151936, torch.bfloat16)]:
        for budget in (2**20, 64 * 2**20, 2**32):
            pl = gemm_backward.plan(M, H, V, dt, budget)
            assert pl.group_rows >= 1 and pl.slab_cols >= 1
            assert pl.workspace_bytes <= max(budget, pl.group_rows * (pl.slab_cols * 4 + 6 * H))
    pl = gemm_backward.plan(8192, 4096, 128256, torch.bfloat16, 2**33)
    assert pl.dw_fp32 and pl.n_groups(8192) == 1
    with pytest.raises(ValueError, match="workspace bytes"):
        gemm_backward.set_workspace_bytes(-1)


def test_workspace_env_is_validated(monkeypatch):
    monkeypatch.setenv("UPG_KERNELS_WORKSPACE_BYTES", "lots")
    with pytest.raises(ValueError, match="UPG_KERNELS_WORKSPACE_BYTES"):
        gemm_backward.workspace_bytes()


@pytest.mark.parametrize("N,H,V,bias,softcap,temperature", [(1, 16, 37, False, None, 1.0),
                                                            (41, 48, 203, True, None, 0.7),
                                                            (20, 32, 130, True, 2.0, 1.0)])
def test_gemm_tiled_forward(monkeypatch, budget, N, H, V, bias, softcap, temperature):
    """UPG_KERNELS_TRITON_FORWARD=gemm: logits slabs + the Triton row-stats kernel, several token
    groups and slabs, vs float64 (values and, through the backward, gradients)."""
    monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", "gemm")
    budget(4 * 16 * 64)                          # 16-row groups x 64-column slabs
    h, w, b, t = _inputs(N, H, V, bias=bias, ignore_every=6, seed=N + 1)
    g = torch.Generator().manual_seed(5)
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)
    kw = dict(softcap=softcap, temperature=temperature)
    ours = _grads("triton", h, w, b, t, gl, ge, **kw)
    ref = _grads("ref", h.double(), w.double(), None if b is None else b.double(), t, gl, ge, **kw)
    for a, r in zip(ours, ref):
        assert _rel(a, r) <= 2e-6, (_rel(a, r), a.shape)
    monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", "fastest")
    with pytest.raises(ValueError, match="UPG_KERNELS_TRITON_FORWARD"):
        token_logprobs(h, w, t, backend="triton")


def test_balanced_groups_on_many_M():
    """balanced_rows / group_bounds: as many groups as the largest group allows (never more), every
    group within the bound, starts on the tile, sizes within one tile of each other (no small tail)."""
    from upg_kernels.kernels.workspace import balanced_rows, group_bounds
    for tile, g_max in ((128, 2688), (128, 128), (16, 48), (128, 8192)):
        for M in list(range(1, 3000, 7)) + [8000, 8192, 8193, 32768, 131071, 2**20, 2**20 + 5]:
            G = balanced_rows(M, g_max, tile)
            assert G % tile == 0 and tile <= G <= g_max
            b = group_bounds(M, G, tile)
            sizes = [g1 - g0 for g0, g1 in b]
            assert b[0][0] == 0 and b[-1][1] == M and all(x[1] == y[0] for x, y in zip(b, b[1:]))
            assert len(b) == -(-M // g_max), (M, g_max, len(b))
            assert max(sizes) <= G and all(g0 % tile == 0 for g0, _ in b)
            assert max(sizes) - min(sizes) < 2 * tile, (M, g_max, sizes[-3:])
    with pytest.raises(ValueError, match="multiple of tile"):
        balanced_rows(100, 100, 16)


def test_dense_plan_at_llama3_8b_has_no_tail():
    """bf16, H=4096, V=128256, 64 MiB: 4 groups of 2048 at N=8192 (not 3 x 2688 + a 128-row tail);
    beyond MAX_DW_ROUNDINGS groups the dW pass (one rounding)."""
    from bench.memory_model import gpu_planning
    with gpu_planning():
        pl = gemm_backward.plan(8192, 4096, 128256, torch.bfloat16, 64 * 2**20, gather=False, gpu=True)
        assert pl.bounds(8192) == [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192)]
        assert pl.dw_mode == "fused" and pl.dw_roundings(8192, torch.bfloat16) == 4
        assert pl.workspace_bytes <= 64 * 2**20
        for M in (32768, 131072, 2**20):
            pl = gemm_backward.plan(M, 4096, 128256, torch.bfloat16, 64 * 2**20, gather=False, gpu=True)
            assert pl.dw_mode == "pass" and pl.dw_roundings(M, torch.bfloat16) == 1
            assert pl.workspace_bytes <= 64 * 2**20 and pl.dw_slab_cols >= 128
            sizes = [b - a for a, b in pl.bounds(M)]
            assert max(sizes) - min(sizes) < 256


def test_bf16_dweight_error_does_not_grow_with_the_number_of_groups(budget, monkeypatch):
    """bf16 dW vs float64 with 1 token group (float32 dW accumulator), and with 12 and 24 groups of 16
    rows (a tiny workspace: beyond MAX_DW_ROUNDINGS the dW pass with its float32 slab accumulator):
    the same error. Forcing one rounding per group instead shows the growth it avoids."""
    N, H, V = 384, 32, 96
    h, w, _, t = _inputs(N, H, V, seed=11, wscale=1.0)
    g = torch.Generator().manual_seed(12)
    gl = torch.randn(N, generator=g).abs() + 1.0       # same-sign coefficients: dW entries add up
    ge = torch.zeros(N)
    hb, wb = h.bfloat16(), w.bfloat16()
    ref = _grads("ref", hb.double(), wb.double(), None, t, gl, ge)[3]

    def dw_err(n_budget, groups, mode):
        budget(n_budget)
        pl = gemm_backward.plan(N, H, V, torch.bfloat16)
        assert pl.n_groups(N) == groups and pl.dw_mode == mode, pl
        return _rel(_grads("triton", hb, wb, None, t, gl, ge, dtype=torch.bfloat16)[3], ref)

    small = 2 * 16 * 64 + 16 * 4 * H
    e_once = dw_err(2**26, 1, "fused")
    e_12 = dw_err(small, 24, "pass")
    monkeypatch.setattr(gemm_backward, "MAX_DW_ROUNDINGS", 10**6)
    e_forced = dw_err(small, 24, "fused")
    assert e_12 <= 1.1 * e_once, (e_12, e_once)
    assert e_forced > 2 * e_12, (e_forced, e_12)      # what the pass avoids
