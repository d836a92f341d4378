"""GEMMs with float32 results from bf16/fp16 operands (triton-free; used by the GEMM backward, the
GEMM-tiled forward and the gradients-in-forward path).

On CUDA (and on ``meta``, for the memory model) cuBLAS writes a float32 result from bf16/fp16 operands
through ``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32`` (torch >= 2.8). Each device
tries, once, the in-place form (``out=``), then the returning form (a temporary, copied), and last
falls back to the product rounded to the operand dtype, with one ``RuntimeWarning`` (docs/limitations.md).
On the CPU (tests) the operands are upcast exactly and multiplied in float32, which is what the
tensor cores compute up to the summation order.
"""
from __future__ import annotations

import warnings

import torch

_MODE = {}   # (op, device type) -> "out" | "ret" | "round"


def _f32(op: str, dev: str, inplace, returning, rounded):
    mode = _MODE.get((op, dev))
    for m, fn in (("out", inplace), ("ret", returning)):
        if mode in (None, m):
            try:
                fn()
                _MODE[(op, dev)] = m
                return
            except (TypeError, RuntimeError, NotImplementedError):
                mode = None
    if (op, dev) not in _MODE:
        warnings.warn(f"torch {torch.__version__} has no float32-output {op} for bf16/fp16 operands on "
                      f"{dev}: products are rounded to the operand dtype before float32 accumulation",
                      RuntimeWarning, stacklevel=3)
        _MODE[(op, dev)] = "round"
    rounded()


def _addmm_f32(c, a, b):
    """``c += a @ b`` for a float32 ``c`` and bf16/fp16 ``a``, ``b``, accumulating in float32."""
    dev = c.device.type
    if dev == "cpu":
        c.addmm_(a.float(), b.float())
        return
    _f32("addmm", dev,
         lambda: torch.addmm(c, a, b, out_dtype=torch.float32, out=c),
         lambda: c.copy_(torch.addmm(c, a, b, out_dtype=torch.float32)),
         lambda: c.add_(a @ b))


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


def mm_f32(a, b, out=None):
    """``a @ b`` as float32 (into ``out`` if given)."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    if a.dtype == torch.float32 or a.device.type == "cpu":
        torch.mm(a.float(), b.float(), out=out)
        return out
    _f32("mm", a.device.type,
         lambda: torch.mm(a, b, out_dtype=torch.float32, out=out),
         lambda: out.copy_(torch.mm(a, b, out_dtype=torch.float32)),
         lambda: out.copy_(a @ b))
    return out
