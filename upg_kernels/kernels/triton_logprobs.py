"""Triton backend of ``token_logprobs`` (see :mod:`upg_kernels.kernels` for the contract).

The forward kernel lives in ``triton_logprobs_fwd``, the backward kernel in ``triton_logprobs_bwd``,
shared helpers and block sizes in ``triton_logprobs_common``; docs/kernels.md explains the design.
float32, bfloat16 and float16 inputs; float64 raises a TypeError (use the torch backend).
"""
from __future__ import annotations

from .triton_logprobs_bwd import backward
from .triton_logprobs_fwd import forward

__all__ = ["forward", "backward"]
