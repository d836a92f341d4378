"""Vocabulary-sized work: per-token log-prob / entropy forward and the logits-recompute backward.

- :mod:`.contract`: what every backend implements (``forward`` / ``backward`` over flat inputs),
  :class:`LogprobParams`, :func:`active_rows`, :func:`zero_grads`.
- :mod:`.backends`: the backend table (``BACKENDS``, one row per backend: its forward paths, backward,
  forward partials for the fused loss epilogue, determinism, device needs), :func:`get_backend`.
- One module per backend or forward path: ``torch_chunked`` ("torch"), ``triton_logprobs_fwd`` (the
  fused forward), ``triton_gemm_fwd`` (the GEMM-tiled forward), ``gemm_backward`` + ``triton_dz``
  ("triton"'s backward), ``triton_logprobs_bwd`` ("triton_atomic"'s backward); shared Triton pieces in
  ``triton_logprobs_common``. docs/kernels.md has the design.
"""
from __future__ import annotations

from .backends import (BACKEND_CHOICES, BACKEND_NAMES, BACKENDS, FORWARD_PATHS,  # noqa: F401
                       TRITON_KERNEL_MODULES, Backend, ForwardPath, get_backend)
from .contract import LogprobParams, active_rows, zero_grads  # noqa: F401
