"""kernels/gemm.py: float32-result GEMMs from bf16 operands, their per-device strategy (in place, then
returning, then rounded with one warning), and the CPU emulation against float64."""
import warnings

import pytest
import torch

from upg_kernels.kernels import gemm


@pytest.fixture(autouse=True)
def fresh_modes():
    gemm._MODE.clear()
    yield
    gemm._MODE.clear()


def test_cpu_emulation_is_exact_fp32_accumulation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(33, 70, generator=g).bfloat16()
    b = torch.randn(70, 19, generator=g).bfloat16()
    c = torch.randn(33, 19, generator=g)
    ref = c.double() + a.double() @ b.double()
    gemm.mm_acc(c, a, b)
    assert ((c.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    z = gemm.mm_f32(a, b)
    assert z.dtype == torch.float32 and torch.allclose(z.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
    cb = torch.zeros(33, 19).bfloat16()
    gemm.mm_acc(cb, a, b)                       # bf16 output: one rounding of the fp32 result
    assert torch.equal(cb, (a.double() @ b.double()).float().bfloat16())


def test_meta_uses_the_float32_output_overloads():
    a = torch.empty(8, 16, device="meta", dtype=torch.bfloat16)
    b = torch.empty(16, 4, device="meta", dtype=torch.bfloat16)
    c = torch.empty(8, 4, device="meta", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemm.mm_acc(c, a, b)
        out = gemm.mm_f32(a, b)
    assert out.dtype == torch.float32 and gemm._MODE[("addmm", "meta")] in ("out", "ret")


def test_fallback_order_and_one_warning(monkeypatch):
    real_mm = torch.mm

    def mm(*args, **kw):
        if "out_dtype" in kw:
            raise TypeError("no out_dtype in this torch")
        return real_mm(*args, **kw)

    monkeypatch.setattr(torch, "mm", mm)
    a = torch.empty(8, 16, device="meta", dtype=torch.bfloat16)
    b = torch.empty(16, 4, device="meta", dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no float32-output mm"):
        out = gemm.mm_f32(a, b)
    assert out.dtype == torch.float32 and gemm._MODE[("mm", "meta")] == "round"
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # warned once per (op, device)
        gemm.mm_f32(a, b)
