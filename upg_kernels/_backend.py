"""Backend selection: a backend name of the table (kernels/backends.py) or ``"auto"``.

``"auto"`` means the first row of the table whose ``auto_on`` names the device: ``"triton"`` (Triton
forward, GEMM backward) on CUDA tensors, the chunked PyTorch path everywhere else (also on CUDA when the
triton package is not installed, and for float64). The environment variable ``UPG_KERNELS_BACKEND``
sets the default that ``backend="auto"`` (or ``None``) resolves to. A backend whose row says
``triton`` raises an ImportError without the triton package, and a ValueError for tensors that are
neither on CUDA nor on ``meta``, unless ``TRITON_INTERPRET=1`` (the interpreter: slow; this is how the
kernels are tested without a GPU).
"""
from __future__ import annotations

import torch

from . import settings
from .kernels.backends import BACKEND_CHOICES as BACKENDS
from .kernels.backends import auto_backend, get_backend, triton_available
from .settings import interpreter_on

__all__ = ["BACKENDS", "resolve_backend", "require_triton", "triton_available", "interpreter_on"]


def require_triton(backend: str = "triton") -> None:
    """Raise a clear ImportError when a Triton backend is asked for without triton installed."""
    if not triton_available():
        raise ImportError(f"backend={backend!r} needs the triton package (pip install triton; "
                          "Linux with CUDA); use backend='torch' (or 'auto') on machines without it")


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return the backend name for a call on ``device`` computing in ``dtype``.

    ``"auto"`` picks the torch backend for float64 (the Triton kernels take fp32/bf16/fp16)."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = settings.BACKEND.get().lower()
        if env not in BACKENDS:
            raise ValueError(f"{settings.BACKEND.name} must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return auto_backend(device, dtype)
    if get_backend(backend).triton:
        require_triton(backend)
        # meta: shape-only host runs (the memory model); kernel launches are skipped (kernels/meta.py)
        if device.type not in ("cuda", "meta") and not interpreter_on():
            raise ValueError(
                f"backend={backend!r} needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"triton is imported to run the kernels on the CPU (tensors are on {device})")
    return backend
