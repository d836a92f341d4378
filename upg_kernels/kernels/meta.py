"""Running the host code at real shapes without computing: the ``meta`` device.

The memory model (``python -m bench --memory-model``) runs every path's host code on ``meta`` tensors
under an allocation tracer: torch ops allocate (shape-only) tensors as they would on the GPU, and
kernel launches are skipped. Launchers go through these helpers so that this works:

- :func:`launch` runs ``kernel[grid](*args, **kw)`` unless a tensor argument is on ``meta``;
- :func:`nonzero_rows` is ``mask.nonzero().squeeze(1)``, except on ``meta`` (where data-dependent
  ops cannot run) it returns every row: the worst case for memory;
- :func:`any_true` is ``bool(mask.any())``, and ``True`` on ``meta``;
- :func:`any_bad` is ``bool(mask.any())`` for an input check, and ``False`` on ``meta`` (there are
  no values to check);
- :func:`autocast_off` is ``torch.autocast(device_type, enabled=False)`` (a no-op on ``meta``, which
  has no autocast).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def is_meta(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, skipped when a tensor argument lives on ``meta``."""
    if is_meta(*args, *kwargs.values()):
        return None
    return kernel[grid](*args, **kwargs)


def nonzero_rows(mask: torch.Tensor) -> torch.Tensor:
    """int64 indices of the true entries of a 1-D ``mask`` (every index on ``meta``)."""
    if mask.device.type == "meta":
        return torch.arange(mask.numel(), device=mask.device)
    return mask.nonzero().squeeze(1)


def any_true(mask: torch.Tensor) -> bool:
    """``bool(mask.any())``; ``True`` on ``meta`` (assume the work is needed)."""
    if mask.device.type == "meta":
        return True
    return bool(mask.any())


def any_bad(mask: torch.Tensor) -> bool:
    """``bool(mask.any())`` where ``mask`` flags invalid input values; ``False`` on ``meta``."""
    if mask.device.type == "meta":
        return False
    return bool(mask.any())


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``; nothing on ``meta`` (no autocast there)."""
    if device_type == "meta":
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False on ``meta``."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)
