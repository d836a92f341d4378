"""The workspace budget of the bounded-memory paths (one owner; triton-free).

``UPG_KERNELS_WORKSPACE_BYTES`` (default 64 MiB) or :func:`set_workspace_bytes` bounds the buffers the
GEMM backward, the GEMM-tiled forward and the gradients-in-forward path allocate besides their inputs
and outputs. Raising it buys speed (bigger token groups: fewer passes over W, fewer dW roundings; a
float32 dW accumulator once ``4·V·H`` more bytes fit).
"""
from __future__ import annotations

from ..settings import WORKSPACE_BYTES as _SETTING

WORKSPACE_BYTES = _SETTING.default
_override = None


def set_workspace_bytes(n: int | None) -> None:
    """Set the backward's workspace budget in bytes (None: back to the environment / default)."""
    global _override
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ValueError(f"workspace bytes must be a positive int or None, got {n!r}")
    _override = n


def workspace_bytes() -> int:
    if _override is not None:
        return _override
    return _SETTING.get()
