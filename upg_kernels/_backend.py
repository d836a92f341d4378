"""Backend selection: ``"triton"``, ``"triton_atomic"``, ``"torch"`` or ``"auto"``.

``"auto"`` means ``"triton"`` (Triton forward, GEMM backward) on CUDA tensors and the chunked PyTorch
path everywhere else; ``"triton_atomic"`` is the single-kernel atomic backward (kernels/__init__.py).
The environment variable ``UPG_KERNELS_BACKEND`` sets the default that ``backend="auto"``
(or ``None``) resolves to. On CPU the Triton backend runs only under ``TRITON_INTERPRET=1``
(slow; this is how the kernels are tested without a GPU).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "triton_atomic", "torch")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on ``device`` computing in ``dtype``.

    ``"auto"`` picks the torch backend for float64 (the Triton kernels take fp32/bf16/fp16)."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("UPG_KERNELS_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(
                f"UPG_KERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend.startswith("triton") and device.type not in ("cuda", "meta") and not interpreter_on():
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"triton is imported to run the kernels on the CPU (tensors are on {device})")
    return backend
