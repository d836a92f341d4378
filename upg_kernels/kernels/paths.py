"""The paths: what each path is (a row of :data:`PATHS`) for the API (``path=``), the settings
(``UPG_KERNELS_PATH``), the selection (:mod:`.select`), the tuning table and the docs. The names
themselves are :mod:`upg_kernels.path_names` (a module that imports nothing, so the settings can read
them); :data:`PATHS` has one row per name, in that order.

A *path* is how the vocabulary-sized work of a call is organised, whatever the backend:

- ``two_pass``: the forward computes the log-probs (and entropy, lse); the backward recomputes the
  logits and applies the coefficients (8·N·H·V flops with gradients). The forward is the backend's
  default forward path (Triton: the fused kernel; torch: the chunked one).
- ``two_pass_gemm_forward``: the same, with the Triton backends' GEMM-tiled forward (cuBLAS logits
  slabs + a row kernel). Triton backends only.
- ``one_pass``: values and gradients in one pass over the logits (6·N·H·V flops; kernels/one_pass.py);
  losses only (``unified_policy_loss``: the coefficients must exist), and only when gradients are
  needed. ``grad_in_forward=True`` is its older spelling.

:func:`eligible` says which paths a call can take; :func:`pinned` which one the caller or the
environment pins (``path=``, ``UPG_KERNELS_PATH``, ``UPG_KERNELS_DETERMINISTIC``); otherwise
:mod:`.select` chooses among the eligible ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import settings
from ..path_names import ONE_PASS, PATH_NAMES, TWO_PASS, TWO_PASS_GEMM_FORWARD


@dataclass(frozen=True)
class Path:
    name: str
    summary: str
    forward: str | None      # the backend forward path (backends.FORWARD_PATHS); None: the default
    one_pass: bool = False   # gradients in the forward (losses only)
    triton_only: bool = False


PATHS = {p.name: p for p in (
    Path(TWO_PASS, "forward (log-probs, entropy) then a logits-recompute backward; 8NHV with "
         "gradients; the backend's default forward (Triton: fused kernel, torch: chunked)", None),
    Path(TWO_PASS_GEMM_FORWARD, "two_pass with the GEMM-tiled forward (cuBLAS logits slabs + a row "
         "kernel); Triton backends only", "gemm", triton_only=True),
    Path(ONE_PASS, "values and gradients in one pass over the logits (6NHV; kernels/one_pass.py); "
         "losses only, when gradients are needed", None, one_pass=True),
)}
DETERMINISTIC_PATH = TWO_PASS   # with the GEMM backward (backend "triton"); no atomics


def check_path(path, arg: str = "path") -> str | None:
    """``path`` validated (None passes through)."""
    if path is None:
        return None
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"{arg} must be None or one of {PATH_NAMES}, got {path!r}")
    return path


def eligible(*, triton: bool, loss: bool, grads: bool, one_pass_ok: bool = True) -> tuple[str, ...]:
    """The paths a call can take: ``triton`` (the backend runs Triton kernels), ``loss`` (a loss with
    coefficients, not ``token_logprobs``), ``grads`` (some input needs a gradient), ``one_pass_ok``
    (the config and budget allow the one-pass path)."""
    out = [TWO_PASS]
    if triton:
        out.append(TWO_PASS_GEMM_FORWARD)
    if loss and grads and one_pass_ok:
        out.append(ONE_PASS)
    return tuple(out)


def deterministic() -> bool:
    """``UPG_KERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``."""
    import torch
    return bool(settings.DETERMINISTIC.get()) or torch.are_deterministic_algorithms_enabled()


def pinned(path: str | None) -> tuple[str | None, str]:
    """``(path, why)``: the path the argument, ``UPG_KERNELS_DETERMINISTIC`` or ``UPG_KERNELS_PATH``
    pins (in that order), or ``(None, "")`` when the selection decides."""
    if check_path(path) is not None:
        return path, "path="
    if deterministic():
        return DETERMINISTIC_PATH, settings.DETERMINISTIC.name
    env = settings.PATH.get()
    if env != "auto":
        return env, settings.PATH.name
    return None, ""


def fit(path: str, options: tuple[str, ...]) -> str:
    """A pinned ``path`` mapped onto the eligible ``options``: a path the call cannot take falls back
    to ``two_pass`` (a pin is a preference for the calls it applies to: ``one_pass`` does not apply
    to ``token_logprobs`` or to calls without gradients, ``two_pass_gemm_forward`` not to the torch
    backend)."""
    return path if path in options else TWO_PASS
