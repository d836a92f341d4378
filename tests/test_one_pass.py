"""The one-pass path (grad_in_forward=True, kernels/one_pass.py + triton_onepass.py): every preset
against the two-pass path in float64 (token-local and sequence-level), the Triton row kernels under the
interpreter against float64, odd shapes, zero-coefficient rows left out, NaN hygiene, bf16 with dW
rounded once, the memory plan and its refusals, and a trace on ``meta`` at llama3-8b N=8192 (6NHV
GEMM flops, no PyTorch pass over the logits chunk)."""
import pytest
import torch

from upg_kernels import LossConfig, unified_policy_loss
from upg_kernels.kernels import LogprobParams, one_pass
from upg_kernels.losses import PRESETS
from upg_kernels.losses.fused import fused_supported

from test_losses import T, H, V, make_case

ALL = sorted(PRESETS)
SEQUENCE_LEVEL = [n for n in ALL if not fused_supported(LossConfig.preset(n, max_completion_length=16))]


def _budget_rows(n, dtype, torch_rows, softcap=False, Vv=V, Hh=H, mode=None):
    """A budget of ``n`` chunk rows plus the dW accumulator the plan puts beside them."""
    return (n * one_pass.row_bytes(Vv, Hh, dtype, torch_rows=torch_rows, softcap=softcap)
            + one_pass.acc_bytes(Vv, Hh, dtype, mode or one_pass.dw_mode()))


@pytest.fixture
def chunks():
    """A budget of ``n`` rows per chunk for the next call (several chunks at test sizes)."""
    def set_rows(n, dtype=torch.float64, torch_rows=True, softcap=False):
        one_pass.set_one_pass_bytes(_budget_rows(n, dtype, torch_rows, softcap))
    yield set_rows
    one_pass.set_one_pass_bytes(None)


def _run(cfg, hid, w, b, tgt, kw, backend="torch", **extra):
    h = hid.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    out = unified_policy_loss(h, ww, tgt, config=cfg, bias=bb, backend=backend, **kw, **extra)
    (1.7 * out.loss).backward()
    return out, (h.grad, ww.grad, None if bb is None else bb.grad)


def _rel(a, r):
    return float((a.double() - r.double()).abs().max() / r.double().abs().max().clamp(min=1e-30))


def _to64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
            for k, v in kw.items()}


@pytest.mark.parametrize("name", ALL)
def test_float64_equals_two_pass(name, chunks):
    """PyTorch row steps in float64, 8 rows a chunk (sequence-level presets: whole sequences of 5)."""
    cfg, hid, w, b, tgt, kw = make_case(name, 4, dtype=torch.float64)
    o1, g1 = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=False)
    chunks(8)
    o2, g2 = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=True)
    assert torch.allclose(o1.loss, o2.loss, rtol=1e-12, atol=1e-14)
    for a, r in zip(g1, g2):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-12)
    assert torch.equal(o1.coef_logp == 0, o2.coef_logp == 0)
    assert o1.metrics == pytest.approx(o2.metrics, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_triton_rows_against_float64(name, chunks):
    """The Triton row kernels (interpreter), float32 inputs, against the float64 two-pass path."""
    cfg, hid, w, b, tgt, kw = make_case(name, 5, dtype=torch.float32)
    chunks(7, torch.float32, torch_rows=False)
    o, g = _run(cfg, hid, w, b, tgt, kw, backend="triton", grad_in_forward=True)
    o64, g64 = _run(cfg, hid.double(), w.double(), b.double(), tgt, _to64(kw), grad_in_forward=False)
    assert abs(o.loss.item() - o64.loss.item()) <= 1e-5 * max(1.0, abs(o64.loss.item()))
    for a, r in zip(g, g64):
        assert _rel(a, r) <= 1e-5
    assert torch.allclose(o.logprobs.double(), o64.logprobs, atol=1e-5)


@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(softcap=2.0),
                                  dict(temperature=1.3, softcap=3.0), dict(no_bias=True)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entropy", [0.0, 0.05])
def test_options(opts, backend, entropy, chunks):
    opts = dict(opts)
    no_bias = opts.pop("no_bias", False)
    cfg, hid, w, b, tgt, kw = make_case("grpo", 6, overrides=dict(entropy_coef=entropy),
                                        with_bias=not no_bias)
    chunks(5, torch.float32, torch_rows=backend == "torch", softcap=bool(opts.get("softcap")))
    o, g = _run(cfg, hid, w, b, tgt, kw, backend=backend, grad_in_forward=True, **opts)
    o64, g64 = _run(cfg, hid.double(), w.double(), None if b is None else b.double(), tgt,
                    _to64(kw), grad_in_forward=False, **opts)
    assert abs(o.loss.item() - o64.loss.item()) <= 1e-5 * max(1.0, abs(o64.loss.item()))
    for a, r in zip(g, g64):
        if r is None:
            assert a is None and no_bias
            continue
        assert _rel(a, r) <= 1e-5
    assert torch.allclose(o.entropy.double(), o64.entropy, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_odd_shapes(backend, chunks):
    """N = 1; every row ignored; every row masked out of the loss; a NaN hidden state in a
    zero-coefficient row (equal-reward group) that shares a chunk with live rows."""
    cfg = LossConfig.preset("grpo")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    h1 = torch.randn(1, H, generator=g, dtype=torch.float64)
    chunks(4, torch.float32, torch_rows=backend == "torch")
    for tgt, mask in ((torch.tensor([3]), None), (torch.tensor([-100]), None),
                      (torch.tensor([3]), torch.tensor([False]))):
        kw = dict(advantages=torch.tensor([0.7]), loss_mask=mask)
        o, gr = _run(cfg, h1.float(), w.float(), None, tgt, kw, backend=backend, grad_in_forward=True)
        o64, g64 = _run(cfg, h1, w, None, tgt, _to64(kw), grad_in_forward=False)
        assert abs(o.loss.item() - o64.loss.item()) <= 1e-6
        for a, r in zip(gr[:2], g64[:2]):
            assert torch.allclose(a.double(), r, atol=1e-6)
    # rows 3..5: equal rewards (advantage 0, no KL / entropy): zero coefficients; row 4 is NaN
    cfg, hid, w, b, tgt, kw = make_case("grpo", 7)
    hid = hid.clone()
    hid[4] = float("nan")
    o, gr = _run(cfg, hid, w, b, tgt, kw, backend=backend, grad_in_forward=True)
    o64, g64 = _run(cfg, hid.double(), w.double(), b.double(), tgt, _to64(kw), grad_in_forward=False)
    assert torch.isfinite(o.loss)
    for a, r in zip(gr, g64):
        assert torch.isfinite(a).all() and _rel(a, r) <= 1e-5


def test_zero_coefficient_rows_left_out(monkeypatch, chunks):
    """Rows whose coefficients are all zero never reach dz or the GEMMs: with the hint (exact here:
    no clipping, so masked rows and the equal-reward group are the zero rows), each chunk's
    dz step runs exactly up to its last live row, and the live rows come first."""
    cfg, hid, w, b, tgt, kw = make_case("grpo", 8, overrides=dict(entropy_coef=0.0, stabilization="none"))
    seen = []
    orig = one_pass.TorchRows.dz

    def spy(self, z, dtype, bias, tgt_c, st, gl, ge, p, K):
        seen.append((K, int(((gl != 0) | (ge != 0 if ge is not None else gl != 0)).sum())))
        return orig(self, z, dtype, bias, tgt_c, st, gl, ge, p, K)
    monkeypatch.setattr(one_pass.TorchRows, "dz", spy)
    chunks(4, torch.float32)
    o, _ = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=True)
    live = int((o.coef_logp != 0).sum())
    assert 0 < live < (tgt != -100).sum()
    assert sum(k for k, _ in seen) == live                 # no dead row inside any prefix
    assert all(k == n for k, n in seen)


def test_sequence_level_whole_sequences(monkeypatch, chunks):
    """GSPO: chunks hold whole sequences; a sequence longer than a chunk is refused when asked for
    explicitly, and the environment switch falls back to the two-pass path."""
    cfg, hid, w, b, tgt, kw = make_case("gspo", 2)
    chunks(T - 1, torch.float32)                           # a chunk is shorter than a sequence
    with pytest.raises(ValueError, match="whole sequences.*UPG_KERNELS_ONE_PASS_BYTES"):
        _run(cfg, hid, w, b, tgt, kw, grad_in_forward=True)
    monkeypatch.setenv("UPG_KERNELS_GRAD_IN_FORWARD", "1")
    o_env, g_env = _run(cfg, hid, w, b, tgt, kw)
    monkeypatch.delenv("UPG_KERNELS_GRAD_IN_FORWARD")
    o2, g2 = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=False)
    assert torch.equal(o_env.loss, o2.loss) and all(torch.equal(a, r) for a, r in zip(g_env, g2))


@pytest.mark.parametrize("mode", ["fp32", "compensated"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_dweight_rounded_once(backend, mode, chunks, monkeypatch):
    """bf16: float32 logits, bf16 dz, dW kept in a float32 accumulator or as a compensated bf16 pair
    (the Triton update kernel under the interpreter with the Triton rows), one rounding at the end,
    against float64 on the same rounded inputs; dW's error stays at one bf16 rounding's size."""
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", mode)
    cfg, hid, w, b, tgt, kw = make_case("grpo", 9, dtype=torch.bfloat16)
    chunks(3, torch.bfloat16, torch_rows=backend == "torch")
    o, g = _run(cfg, hid, w, b, tgt, kw, backend=backend, grad_in_forward=True)
    o64, g64 = _run(cfg, hid.double(), w.double(), b.double(), tgt, _to64(kw), grad_in_forward=False)
    assert abs(o.loss.item() - o64.loss.item()) <= 1e-5 * max(1.0, abs(o64.loss.item()))
    for a, r in zip(g, g64):
        assert a.dtype == torch.bfloat16 and _rel(a, r) < 1e-2
    assert _rel(g[1], g64[1]) < 2 * 2.0 ** -8            # one rounding of dW (plus bf16 dz)


# ------------------------------------------------------------------------------ the row kernels
@pytest.mark.parametrize("Vv", [1, 37, 100])
@pytest.mark.parametrize("flags", [dict(), dict(bias=True), dict(softcap=2.5, temperature=0.8),
                                   dict(bias=True, softcap=3.0, gent=True), dict(gent=True)])
def test_row_kernels_against_float64(Vv, flags):
    """TritonRows (interpreter) and TorchRows against float64 formulas: stats of every row, dz of
    the first K rows (zero-coefficient rows exactly 0), dz written over the logits' bytes."""
    from upg_kernels.kernels.triton_onepass import TritonRows
    g = torch.Generator().manual_seed(Vv)
    G, K = 7, 5
    z0 = torch.randn(G, Vv, generator=g, dtype=torch.float64) * 3
    bias = torch.randn(Vv, generator=g, dtype=torch.float64) if flags.get("bias") else None
    tgt = torch.randint(0, Vv, (G,), generator=g)
    gl = torch.randn(G, generator=g, dtype=torch.float64)
    gl[1] = 0.0
    ge = torch.randn(G, generator=g, dtype=torch.float64) if flags.get("gent") else None
    if ge is not None:
        ge[1] = 0.0
    p = LogprobParams(temperature=flags.get("temperature", 1.0), softcap=flags.get("softcap", 0.0))
    # float64 reference: z = softcap(z0 + b) / T
    zz = z0 + (bias if bias is not None else 0)
    zz = p.softcap * torch.tanh(zz / p.softcap) if p.softcap else zz
    zz = zz / p.temperature
    lse = torch.logsumexp(zz, -1)
    logp = zz - lse[:, None]
    prob = logp.exp()
    ent = -(prob * logp).sum(-1)
    gev = ge if ge is not None else torch.zeros(G, dtype=torch.float64)
    dz = -gl[:, None] * prob - gev[:, None] * prob * (logp + ent[:, None])
    dz[torch.arange(G), tgt] += gl
    dz /= p.temperature
    if p.softcap:
        dz *= 1 - torch.tanh((z0 + (bias if bias is not None else 0)) / p.softcap) ** 2
    for rows in (TritonRows(), one_pass.TorchRows()):
        for dt in (torch.float32, torch.bfloat16):
            z = z0.float().clone()
            b = None if bias is None else bias.to(dt)
            bref = None if bias is None else bias.to(dt).double()
            st = rows.stats(z, b, tgt, p)
            if bref is None or dt == torch.float32:
                assert torch.allclose(st[0].double(), lse, atol=1e-5)
                assert torch.allclose(st[1].double(), ent, atol=1e-5)
                assert torch.allclose(st[2].double(), logp[torch.arange(G), tgt], atol=1e-5)
            out = rows.dz(z, dt, b, tgt, st, gl.float(), None if ge is None else ge.float(), p, K)
            assert out.shape == (K, Vv) and out.dtype == dt
            if bref is None or dt == torch.float32:
                tol = 1e-5 if dt == torch.float32 else 1e-2
                assert torch.allclose(out.double(), dz[:K], atol=tol * dz.abs().max().item())
            assert (out[1] == 0).all()                         # zero coefficients: exact zeros
            if isinstance(rows, TritonRows):                   # in place: the logits' storage
                assert out.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------ the memory plan
LLAMA_HV = (4096, 128256)
QWEN35_HV = (5120, 248320)      # Qwen3.5-27B's head


def test_plan_default_budget_llama3_8b():
    """The default budget (3 GiB) at llama3-8b N=8192, bf16: the float32 dW accumulator (4·V·H =
    1.96 GiB) plus 4 balanced chunks of 2048 rows, all within the budget."""
    Hl, Vl = LLAMA_HV
    assert one_pass.ONE_PASS_BYTES == 3 * 2**30
    pl = one_pass.plan(8192, Hl, Vl, torch.bfloat16, gpu=True)
    per = 4 * Vl + 2 * Hl + 2 * Hl                    # float32 logits row, gathered h, dh staging
    assert pl.dw_fp32 and pl.acc_bytes == 4 * Vl * Hl == 2_101_346_304
    assert pl.max_rows == (3 * 2**30 - pl.acc_bytes) // per // 16 * 16 == 2112
    assert (pl.chunk_rows, pl.n_chunks) == (2048, 4) and pl.chunk_bytes == 2048 * per
    assert pl.total_bytes == pl.chunk_bytes + pl.acc_bytes <= pl.budget == 3 * 2**30
    assert pl.dw_roundings == 1 and pl.dw_mode == "fp32"
    # no weight gradient: no accumulator, the whole budget for chunks
    nw = one_pass.plan(8192, Hl, Vl, torch.bfloat16, gpu=True, need_weight=False)
    assert nw.acc_bytes == 0 and nw.n_chunks == 2
    # float32 gradients (float32 weights, also under bf16 autocast: the weight is cast slab by slab)
    # accumulate in the gradient itself: no accumulator
    for gd, dt in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16)):
        p32 = one_pass.plan(8192, Hl, Vl, dt, gpu=True, w_dtype=gd)
        assert not p32.dw_fp32 and p32.acc_bytes == 0 and p32.dw_roundings == 1
        assert p32.total_bytes <= p32.budget and (p32.cast_bytes > 0) == (dt != gd)


def test_plan_refusals_name_the_settings():
    """Qwen3.5-27B's head at the default budget: the accumulator alone (4.74 GiB) exceeds 3 GiB,
    refused with the numbers and both settings; a budget that holds it plus 256-row chunks fits;
    ``per_chunk`` needs no accumulator (and says how many roundings it makes)."""
    Hq, Vq = QWEN35_HV
    acc = 4 * Vq * Hq
    per = one_pass.row_bytes(Vq, Hq, torch.bfloat16, torch_rows=False)
    with pytest.raises(ValueError) as e:
        one_pass.plan(8192, Hq, Vq, torch.bfloat16, gpu=True)
    msg = str(e.value)
    for part in (f"{acc + 256 * per} bytes", f"float32 dW accumulator of {acc} bytes", "256 rows",
                 "UPG_KERNELS_ONE_PASS_BYTES", f"grants {3 * 2**30}", "UPG_KERNELS_ONE_PASS_DW=per_chunk",
                 "path='two_pass'"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="UPG_KERNELS_ONE_PASS_BYTES"):
        one_pass.plan(8192, Hq, Vq, torch.bfloat16, acc + 256 * per - 1, gpu=True)
    pl = one_pass.plan(8192, Hq, Vq, torch.bfloat16, acc + 256 * per, gpu=True)
    assert pl.chunk_rows == 256 and pl.n_chunks == 32 and pl.total_bytes == acc + 256 * per
    pc = one_pass.plan(8192, Hq, Vq, torch.bfloat16, 3 * 2**30, gpu=True, mode="per_chunk")
    assert pc.acc_bytes == 0 and not pc.dw_fp32 and pc.dw_roundings == pc.n_chunks == 3
    # chunks below 256 rows are refused on CUDA even without an accumulator (a slow crawl) ...
    Hl, Vl = LLAMA_HV
    with pytest.raises(ValueError, match="256 rows") as e:
        one_pass.plan(8192, Hl, Vl, torch.bfloat16, 64 * 2**20, gpu=True, mode="per_chunk")
    assert "UPG_KERNELS_ONE_PASS_DW" not in str(e.value)         # nothing to switch off
    # ... but a call with fewer rows runs in one chunk of its size
    assert one_pass.plan(100, Hl, Vl, torch.bfloat16, 64 * 2**20, gpu=True, mode="per_chunk").chunk_rows == 100
    with pytest.raises(ValueError, match="fp32.*per_chunk"):
        one_pass.plan(8192, Hl, Vl, torch.bfloat16, mode="fast")


def test_plan_compensated():
    """``compensated``: the bf16 remainder (2·V·H) and a float32 product slab of 4096 rows count in
    the budget; at llama3-8b N=8192 a 2 GiB budget holds it with 5 chunks of 1648 rows."""
    Hl, Vl = LLAMA_HV
    pl = one_pass.plan(8192, Hl, Vl, torch.bfloat16, 2 * 2**30, gpu=True, mode="compensated")
    assert pl.acc_bytes == 2 * Vl * Hl + 4 * 4096 * Hl and pl.dw_pair and not pl.dw_fp32
    assert (pl.chunk_rows, pl.n_chunks) == (1648, 5) and pl.total_bytes <= 2 * 2**30
    assert pl.dw_roundings == 1
    assert one_pass.acc_bytes(19, 12, torch.bfloat16, "compensated") == 2 * 19 * 12 + 4 * 19 * 12
    assert one_pass.acc_bytes(Vl, Hl, torch.float32, "compensated") == 0
    with pytest.raises(ValueError, match="compensated dW remainder.*UPG_KERNELS_ONE_PASS_DW=per_chunk"):
        one_pass.plan(8192, Hl, Vl, torch.bfloat16, 2**30, gpu=True, mode="compensated")


@pytest.mark.parametrize("hi_dtype", [torch.bfloat16, torch.float16])
def test_pair_kernel_matches_torch_form(hi_dtype):
    """The compensated update kernel (interpreter) equals its torch form bit for bit, and hi + lo
    tracks a float64 running sum to ~1e-4 relative (a bf16 pair: about 16 significant bits) over many
    small addends, where plain accumulation in hi's dtype stalls."""
    from upg_kernels.kernels.triton_onepass import pair_add_
    g = torch.Generator().manual_seed(2)
    n = 300                                         # not a multiple of the block
    hi_t = torch.zeros(n, dtype=hi_dtype)
    lo_t = torch.zeros(n, dtype=torch.bfloat16)
    hi_k, lo_k = hi_t.clone(), lo_t.clone()
    ref = torch.zeros(n, dtype=torch.float64)
    plain = torch.zeros(n, dtype=hi_dtype)
    for i in range(40):
        p = torch.randn(n, generator=g) * (1.0 if i == 0 else 1e-3)
        ref += p.double()
        plain = (plain.float() + p).to(hi_dtype)
        one_pass.pair_add_torch_(hi_t, lo_t, p.clone())
        pair_add_(hi_k, lo_k, p.clone())
        assert torch.equal(hi_t, hi_k) and torch.equal(lo_t, lo_k), i
    err = float((hi_k.double() + lo_k.double() - ref).abs().max() / ref.abs().max())
    plain_err = float((plain.double() - ref).abs().max() / ref.abs().max())
    assert err <= 1e-4 and plain_err > 20 * err, (err, plain_err)
    # the gradient is hi: within one rounding of the running sum
    assert (hi_k.double() - ref).abs().max() <= 2.0 ** -8 * ref.abs().max()


def test_dw_mode_setting(monkeypatch):
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", "per_chunk")
    assert one_pass.dw_mode() == "per_chunk"
    assert one_pass.plan(8192, *LLAMA_HV, torch.bfloat16, gpu=True).acc_bytes == 0
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", "bf16")
    with pytest.raises(ValueError, match="UPG_KERNELS_ONE_PASS_DW"):
        one_pass.dw_mode()


def test_refusal_through_the_loss(chunks, monkeypatch):
    """bf16 weights, a budget that holds 3 rows but not the accumulator: ``path='one_pass'`` is
    a ValueError naming both settings; unpinned (model selection) the call runs the two-pass path;
    with ``UPG_KERNELS_ONE_PASS_DW=per_chunk`` the same budget runs the one-pass path."""
    cfg, hid, w, b, tgt, kw = make_case("grpo", 4, dtype=torch.bfloat16)
    budget = _budget_rows(3, torch.bfloat16, True, mode="per_chunk")
    assert budget < one_pass.acc_bytes(V, H, torch.bfloat16, "fp32")
    one_pass.set_one_pass_bytes(budget)
    try:
        with pytest.raises(ValueError, match="UPG_KERNELS_ONE_PASS_BYTES.*UPG_KERNELS_ONE_PASS_DW=per_chunk"):
            _run(cfg, hid, w, b, tgt, kw, path="one_pass")
        seen = []
        monkeypatch.setattr(one_pass, "forward_with_grads", lambda *a, **k: seen.append(1))
        monkeypatch.setenv("UPG_KERNELS_AUTOTUNE", "model")
        monkeypatch.setattr("upg_kernels.kernels.select.MODEL_MIN_LOGITS", 1)
        _run(cfg, hid, w, b, tgt, kw)                                # not eligible: two-pass
        assert not seen
        monkeypatch.undo()
        monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", "per_chunk")
        o, g = _run(cfg, hid, w, b, tgt, kw, path="one_pass")
        assert g[1].dtype == torch.bfloat16 and torch.isfinite(g[1]).all()
    finally:
        one_pass.set_one_pass_bytes(None)


def _dw_error(mode, rows_per_chunk, monkeypatch):
    """Frobenius relative error of bf16 dW (one-pass, PyTorch row steps) against float64 on the same
    bf16 inputs: GRPO, B*T = 1024 rows, V = 64, H = 32, the budget forcing ``rows_per_chunk``."""
    g = torch.Generator().manual_seed(11)
    Bq, Tq, Hq, Vq = 32, 32, 32, 64
    hid = (torch.randn(Bq, Tq, Hq, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    w = (torch.randn(Vq, Hq, generator=g, dtype=torch.float64) * 0.3).to(torch.bfloat16)
    tgt = torch.randint(0, Vq, (Bq, Tq), generator=g)
    kw = dict(advantages=torch.randn(Bq, generator=g))
    cfg = LossConfig.preset("grpo", stabilization="none")
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", mode)
    one_pass.set_one_pass_bytes(_budget_rows(rows_per_chunk, torch.bfloat16, True, Vv=Vq, Hh=Hq))
    try:
        _, gr = _run(cfg, hid, w, None, tgt, kw, grad_in_forward=True)
    finally:
        one_pass.set_one_pass_bytes(None)
    _, g64 = _run(cfg, hid.double(), w.double(), None, tgt, _to64(kw), grad_in_forward=False)
    assert gr[1].dtype == torch.bfloat16
    return float((gr[1].double() - g64[1]).norm() / g64[1].norm())


def test_dw_error_does_not_grow_with_chunks(monkeypatch):
    """The default (float32 accumulator) and ``compensated``: dW's error at 128 chunks of 8 rows is
    that of one chunk of 1024 rows (one rounding, about 2^-9 relative, plus bf16 dz); the per-chunk
    mode's grows with the chunk count (the check a naive per-chunk bf16 accumulation fails)."""
    one = _dw_error("fp32", 1024, monkeypatch)
    many = _dw_error("fp32", 8, monkeypatch)
    assert one < 3e-3 and many <= one * 1.05 + 1e-5, (one, many)
    pair = _dw_error("compensated", 8, monkeypatch)
    assert pair <= one * 1.05 + 1e-5, (one, pair)
    naive = _dw_error("per_chunk", 8, monkeypatch)
    few = _dw_error("per_chunk", 256, monkeypatch)
    assert naive > 3 * many and naive > 2 * few, (naive, few, many)


def test_float32_weights_accumulate_in_the_gradient():
    """float32 weights: one [V, H] float32 tensor is allocated in forward + backward, and it is
    ``weight.grad`` (accumulated in place, scaled in place, handed to autograd without a copy).
    bf16 weights: the float32 accumulator and the bf16 gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.vh = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (V, H) and not func.is_view:
                ins = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                       if isinstance(a, torch.Tensor)}
                if out.untyped_storage().data_ptr() not in ins:
                    self.vh.append((func.overloadpacket.__name__, out.dtype, out.untyped_storage().data_ptr()))
            return out

    for dt in (torch.float32, torch.bfloat16):
        cfg, hid, w, b, tgt, kw = make_case("grpo", 5, dtype=dt)
        h = hid.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        spy = Spy()
        with spy:
            out = unified_policy_loss(h, ww, tgt, config=cfg, backend="torch", grad_in_forward=True, **kw)
            out.loss.backward()
        if dt == torch.float32:
            assert [x[1] for x in spy.vh] == [torch.float32], spy.vh
            assert spy.vh[0][2] == ww.grad.untyped_storage().data_ptr()
        else:
            assert sorted(str(x[1]) for x in spy.vh) == ["torch.bfloat16", "torch.float32"], spy.vh
            assert ww.grad.dtype == torch.bfloat16


def test_compensated_gradient_is_hi(monkeypatch):
    """``compensated``: the bf16 gradient is allocated in the forward and handed to autograd (scaled
    in place); beside it only the bf16 remainder and the float32 product slab (here V < 4096 rows,
    so the slab is [V, H])."""
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", "compensated")
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("zeros", "empty", "new_zeros", "zeros_like") and \
                    isinstance(out, torch.Tensor) and tuple(out.shape) == (V, H):
                seen.append((out.dtype, out.untyped_storage().data_ptr()))
            return out

    cfg, hid, w, b, tgt, kw = make_case("grpo", 5, dtype=torch.bfloat16)
    ww = w.clone().requires_grad_(True)
    with Spy():
        out = unified_policy_loss(hid, ww, tgt, config=cfg, backend="torch", grad_in_forward=True, **kw)
        out.loss.backward()
    assert sorted(str(d) for d, _ in seen) == ["torch.bfloat16", "torch.bfloat16", "torch.float32"], seen
    assert ww.grad.untyped_storage().data_ptr() == seen[0][1]


def test_second_backward_is_refused():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 6)
    h = hid.clone().requires_grad_(True)
    out = unified_policy_loss(h, w, tgt, config=cfg, bias=b, backend="torch", grad_in_forward=True, **kw)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*two_pass"):
        out.loss.backward()


def test_budget_errors(monkeypatch):
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_BYTES", "lots")
    with pytest.raises(ValueError, match="UPG_KERNELS_ONE_PASS_BYTES"):
        one_pass.one_pass_bytes()
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_BYTES", "12345")
    assert one_pass.one_pass_bytes() == 12345
    with pytest.raises(ValueError, match="positive int"):
        one_pass.set_one_pass_bytes(-1)
    monkeypatch.delenv("UPG_KERNELS_ONE_PASS_BYTES")
    cfg, hid, w, b, tgt, kw = make_case("grpo", 0)
    one_pass.set_one_pass_bytes(8)
    try:
        with pytest.raises(ValueError, match="UPG_KERNELS_ONE_PASS_BYTES"):
            _run(cfg, hid, w, b, tgt, kw, grad_in_forward=True)
    finally:
        one_pass.set_one_pass_bytes(None)


# ------------------------------------------------------------------------------ the meta trace
LLAMA = dict(B=16, T=512, H=4096, V=128256)      # llama3-8b's head, N = 8192


def _trace_llama3_8b(backend):
    """One forward + backward of GRPO with entropy, bf16, at llama3-8b N=8192 on ``meta`` with the
    GPU plan: ``(GEMM flops, non-GEMM bytes other than [V, H]-shaped, [V, H] bytes, non-GEMM ops that
    touch a [rows, V] tensor of 64 rows or more)``. Views and allocations are not traffic."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from bench.memory_model import gpu_planning

    Bq, Tq, Hl, Vl = LLAMA["B"], LLAMA["T"], LLAMA["H"], LLAMA["V"]
    gemms = {"mm", "addmm", "bmm", "baddbmm"}
    free = {"empty", "empty_strided", "empty_like", "lift_fresh", "alias", "detach"}
    st = dict(flops=0, nh=0, vh=0, big=[])

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in gemms:
                a, b2 = args[1:3] if name in ("addmm", "baddbmm") else args[:2]
                st["flops"] += 2 * a.shape[-2] * a.shape[-1] * b2.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
                return out
            if func.is_view or name in free:
                return out
            for t in tree_flatten((args, kwargs, out))[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                if tuple(t.shape) == (Vl, Hl):
                    st["vh"] += t.numel() * t.element_size()
                else:
                    st["nh"] += t.numel() * t.element_size()
                    if t.dim() and t.shape[-1] in (Vl, 2 * Vl) and t.numel() >= 64 * Vl:
                        st["big"].append((name, tuple(t.shape)))
            return out

    dev = "meta"
    h = torch.empty(Bq, Tq, Hl, dtype=torch.bfloat16, device=dev).requires_grad_(True)
    w = torch.empty(Vl, Hl, dtype=torch.bfloat16, device=dev).requires_grad_(True)
    tgt = torch.empty(Bq, Tq, dtype=torch.int64, device=dev)
    kw = dict(loss_mask=torch.empty(Bq, Tq, dtype=torch.float32, device=dev),
              advantages=torch.empty(Bq, dtype=torch.float32, device=dev),
              old_logprobs=torch.empty(Bq, Tq, dtype=torch.float32, device=dev))
    cfg = LossConfig.preset("grpo", entropy_coef=0.01)
    with gpu_planning(), Spy():
        out = unified_policy_loss(h, w, tgt, config=cfg, backend=backend, grad_in_forward=True, **kw)
        out.loss.backward()
    assert h.grad is not None and w.grad is not None
    return st


def test_meta_trace_llama3_8b():
    """The one-pass path at llama3-8b N=8192: the GEMMs do 6·N·H·V flops (±5%); no non-GEMM aten op
    reads or writes a logits-chunk-sized tensor (the row kernels do that work); the non-GEMM traffic
    is O(N·H) (gathers, scatters, the per-chunk epilogue on [N] vectors) plus a constant number of
    passes over [V, H] (zeroing the float32 dW accumulator, the final scale-and-cast)."""
    N, Hl, Vl = LLAMA["B"] * LLAMA["T"], LLAMA["H"], LLAMA["V"]
    st = _trace_llama3_8b("triton")
    assert abs(st["flops"] / (6 * N * Hl * Vl) - 1) <= 0.05, st["flops"] / (6 * N * Hl * Vl)
    assert not st["big"], st["big"][:5]
    assert st["nh"] <= 64 * N * Hl, st["nh"] / (N * Hl)
    assert st["vh"] <= 16 * Vl * Hl, st["vh"] / (Vl * Hl)


def test_meta_trace_sees_pytorch_passes():
    """The trace's check can fail: the PyTorch row steps (the CPU form) make passes over the chunk."""
    st = _trace_llama3_8b("torch")
    assert st["big"] and any(op == "exp" for op, _ in st["big"])


@pytest.mark.parametrize("dtype,mode", [(torch.bfloat16, "fp32"), (torch.float32, "fp32"),
                                        (torch.bfloat16, "compensated"), (torch.float16, "compensated")])
@pytest.mark.parametrize("bias,softcap,entropy", [(False, None, 0.0), (True, 30.0, 0.01)])
def test_launches_are_registered(monkeypatch, dtype, mode, bias, softcap, entropy):
    """Every row-kernel launch of the one-pass path (captured on meta) is a registered variant of
    the compile check (the full flag product is registered)."""
    from test_aot_check import _launched_constexprs, _variants
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", mode)
    N, Hh, Vv = 64, 256, 1000
    dev = "meta"
    h = torch.empty(N, Hh, dtype=dtype, device=dev, requires_grad=True)
    w = torch.empty(Vv, Hh, dtype=dtype, device=dev, requires_grad=True)
    b = torch.empty(Vv, dtype=dtype, device=dev, requires_grad=True) if bias else None
    t = torch.empty(N, dtype=torch.int64, device=dev)
    cfg = LossConfig.preset("grpo", entropy_coef=entropy)

    def run():
        out = unified_policy_loss(h, w, t, config=cfg, bias=b, softcap=softcap, backend="triton",
                                  advantages=torch.empty(N, device=dev), grad_in_forward=True)
        out.loss.backward()

    launched = _launched_constexprs(monkeypatch, "triton_onepass", run)
    registered = [v.constexprs for v in _variants("triton_onepass")]
    assert len(launched) >= 2
    for cx in launched:
        assert cx in registered, f"unregistered one-pass launch {cx}"


def test_dw_rounding_emulation():
    """bench.dw_rounding (the emulation behind the docs' table): the float32 accumulator and the
    compensated pair equal one rounding at any chunk count; per-chunk rounding grows with it."""
    from bench import dw_rounding
    few = dw_rounding.emulate(2048, 1024, V=64, H=16)
    many = dw_rounding.emulate(2048, 64, V=64, H=16)
    for r in (few, many):
        assert r["fp32"]["fro_rel"] <= r["once"]["fro_rel"] * 1.01 + 1e-6
        assert r["compensated"]["fro_rel"] <= r["once"]["fro_rel"] * 1.01 + 1e-6
    assert many["per_chunk"]["fro_rel"] > 2 * few["per_chunk"]["fro_rel"] > 2 * few["once"]["fro_rel"]
    assert "| 2048 | 64 | 32 |" in dw_rounding.table([many])


def test_autocast_float32_weights_accumulate_in_float32():
    """float32 weights under autocast (bf16 compute; the weight cast slab by slab): the one-pass path
    accumulates dW in the float32 gradient itself -- no float32 accumulator beside it, dW not
    rounded to bf16 -- and matches float64 on the bf16-rounded inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    cfg, hid, w, b, tgt, kw = make_case("grpo", 7, with_bias=False)
    h = hid.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (V, H) and \
                    func.overloadpacket.__name__ in ("zeros", "empty", "empty_like", "zeros_like"):
                seen.append(out.dtype)
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
        out = unified_policy_loss(h, ww, tgt, config=cfg, backend="torch", grad_in_forward=True, **kw)
        (1.7 * out.loss).backward()                                   # as _run's reference
    # one float32 [V, H] (the gradient); a bf16 one is the weight's cast slab (V < its rows here)
    assert ww.grad.dtype == torch.float32 and seen.count(torch.float32) == 1, seen
    assert set(seen) <= {torch.float32, torch.bfloat16}, seen
    assert not torch.equal(ww.grad, ww.grad.to(torch.bfloat16).float())     # not bf16-rounded
    h64, w64 = hid.to(torch.bfloat16).double(), w.to(torch.bfloat16).double()
    _, g64 = _run(cfg, h64, w64, None, tgt, _to64(kw), grad_in_forward=False)
    assert _rel(ww.grad, g64[1]) < 2.0 ** -8 and _rel(h.grad, g64[0]) < 1e-2


def test_autocast_master_weights_fall_back(monkeypatch):
    """The same float32 weights under autocast with a sequence-level config whose sequence does not
    fit a chunk, the one-pass path turned on by the environment: the call falls back to the two-pass
    path inside the autograd function and gives what the two-pass path gives."""
    cfg, hid, w, b, tgt, kw = make_case("gspo", 2, with_bias=False)
    one_pass.set_one_pass_bytes(_budget_rows(T - 1, torch.bfloat16, True, mode="per_chunk"))
    seen = []
    orig = one_pass.forward_with_grads

    def spy(*a, **k):
        seen.append(a[1].dtype)                        # the weight as the one-pass path gets it
        return orig(*a, **k)
    monkeypatch.setattr(one_pass, "forward_with_grads", spy)
    grads = []
    try:
        for env in ("1", "0"):
            monkeypatch.setenv("UPG_KERNELS_GRAD_IN_FORWARD", env)
            ww = w.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = unified_policy_loss(hid, ww, tgt, config=cfg, backend="torch", **kw)
                out.loss.backward()
            grads.append(ww.grad)
    finally:
        one_pass.set_one_pass_bytes(None)
    assert seen == [torch.float32]                     # tried (master weights), then fell back
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0], grads[1])


def test_plan_budget_exactly_the_rows_of_a_small_call():
    """A call of M < 256 rows on CUDA (M not a multiple of 16) whose budget holds exactly its M rows
    runs in one chunk of M rows: the 16-row rounding of the budget's chunk must not refuse a plan that
    fits (the error would quote a need that is within the budget)."""
    Hl, Vl = LLAMA_HV
    per = one_pass.row_bytes(Vl, Hl, torch.bfloat16, torch_rows=False)
    for M in (17, 100, 255):
        for extra in (0, per - 1, 15 * per):
            budget = M * per + extra
            pl = one_pass.plan(M, Hl, Vl, torch.bfloat16, budget, gpu=True, mode="per_chunk")
            assert (pl.chunk_rows, pl.n_chunks) == (M, 1) and pl.total_bytes <= budget
        with pytest.raises(ValueError, match=f"{M * per} bytes"):
            one_pass.plan(M, Hl, Vl, torch.bfloat16, M * per - 1, gpu=True, mode="per_chunk")
