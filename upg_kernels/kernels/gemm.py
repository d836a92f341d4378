"""GEMMs that accumulate in float32 into an existing output (triton-free; used by the GEMM backward
and the gradients-in-forward path)."""
from __future__ import annotations

import torch

_OUT_DTYPE_OK = {}


def _addmm_f32(c, a, b):
    """``c += a @ b`` for a float32 ``c`` and bf16/fp16 ``a``, ``b``, accumulating in fp32.

    CUDA (and meta): cuBLAS with a float32 output (``torch.addmm(..., out_dtype=float32)``, torch >= 2.8),
    else the product rounded to the operand dtype and added (one rounding per slab; noted in
    docs/kernels.md). CPU: the operands upcast (exactly) and multiplied in float32, which is what the
    tensor cores compute up to the summation order."""
    dev = c.device.type
    if dev == "cpu":
        c.addmm_(a.float(), b.float())
        return
    ok = _OUT_DTYPE_OK.get(dev)
    if ok is None or ok:
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            _OUT_DTYPE_OK[dev] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_OK[dev] = False
    c.add_(a @ b)


def mm_acc(c, a, b):
    """``c += a @ b`` with fp32 accumulation; ``c`` in float32 or in the operands' dtype (then one
    rounding per call: cuBLAS computes ``a @ b + c`` in fp32 and rounds once)."""
    if c.dtype == a.dtype:
        if c.device.type == "cpu" and c.dtype != torch.float32 and c.dtype != torch.float64:
            c.copy_(c.float().addmm_(a.float(), b.float()))   # CPU: the same single rounding
        else:
            c.addmm_(a, b)
    else:
        _addmm_f32(c, a, b)


_MM_OUT_DTYPE_OK = {}


def mm_f32(a, b, out=None):
    """``a @ b`` as float32 (``out`` if given). CUDA / meta: cuBLAS writes float32 from bf16/fp16
    operands (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8), else the product rounded to
    the operand dtype is upcast (named in docs/limitations.md); CPU: operands upcast exactly."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    if a.dtype == torch.float32 or a.device.type == "cpu":
        torch.mm(a.float(), b.float(), out=out)
        return out
    dev = a.device.type
    if _MM_OUT_DTYPE_OK.get(dev, True):
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            _MM_OUT_DTYPE_OK[dev] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[dev] = False
    out.copy_(a @ b)
    return out
