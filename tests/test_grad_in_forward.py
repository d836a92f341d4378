"""grad_in_forward: token-local losses computed with their gradients in one pass (6NHV) equal the
two-pass path for every token-local preset; bf16; bias / softcap / temperature; chunking; errors."""
import pytest
import torch

from upg_kernels import LossConfig, unified_policy_loss
from upg_kernels.kernels import workspace
from upg_kernels.losses.fused import fused_supported
from upg_kernels.losses import PRESETS

from test_losses import make_case

TOKEN_LOCAL = [n for n in sorted(PRESETS)
               if fused_supported(LossConfig.preset(n, max_completion_length=16))]


@pytest.fixture
def small_workspace():
    workspace.set_workspace_bytes(3 * 12 * 19)       # 3 rows of the V=19 vocabulary per chunk
    yield
    workspace.set_workspace_bytes(None)


def _run(cfg, hid, w, b, tgt, kw, **extra):
    h = hid.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True)
    out = unified_policy_loss(h, ww, tgt, config=cfg, bias=bb, backend="torch", **kw, **extra)
    (1.7 * out.loss).backward()
    return out, (h.grad, ww.grad, bb.grad)


@pytest.mark.parametrize("name", TOKEN_LOCAL)
def test_equals_two_pass(name, small_workspace):
    cfg, hid, w, b, tgt, kw = make_case(name, 4, dtype=torch.float64)
    o1, g1 = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=False)
    o2, g2 = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=True)
    assert torch.allclose(o1.loss, o2.loss, rtol=1e-12, atol=1e-14)
    for a, r in zip(g1, g2):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-12)
    assert o1.metrics == pytest.approx(o2.metrics, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(softcap=2.0)])
def test_bf16_and_options(opts, small_workspace):
    """bf16 inputs: float32 logits chunks, bf16 gradients; against float64 on the same (rounded)
    inputs (the two-pass torch backend rounds its logits to bf16, so it is no oracle here)."""
    cfg, hid, w, b, tgt, kw = make_case("grpo", 5, dtype=torch.bfloat16)
    o2, g2 = _run(cfg, hid, w, b, tgt, kw, grad_in_forward=True, **opts)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
            for k, v in kw.items()}
    o_ref, g_ref = _run(cfg, hid.double(), w.double(), b.double(), tgt, kw64, grad_in_forward=False,
                        **opts)
    assert abs(o_ref.loss.item() - o2.loss.item()) <= 1e-5 * max(1.0, abs(o_ref.loss.item()))
    for a, r in zip(g2, g_ref):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - r).abs().max() / r.abs().max()) < 1e-2


def test_errors():
    cfg, hid, w, b, tgt, kw = make_case("gspo", 0)
    with pytest.raises(ValueError, match="token-local"):
        unified_policy_loss(hid, w, tgt, config=cfg, bias=b, grad_in_forward=True, **kw)
    cfg, hid, w, b, tgt, kw = make_case("grpo", 0)
    workspace.set_workspace_bytes(8)
    try:
        with pytest.raises(ValueError, match="UPG_KERNELS_WORKSPACE_BYTES"):
            unified_policy_loss(hid.requires_grad_(True), w, tgt, config=cfg, bias=b,
                                grad_in_forward=True, **kw)
    finally:
        workspace.set_workspace_bytes(None)
