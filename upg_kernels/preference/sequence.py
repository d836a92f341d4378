"""Per-sequence log-probs ``sum_t m_t log pi(y_t | y_<t, x)`` from the fused kernel.

The per-token log-probs come from :func:`upg_kernels.token_logprobs` (forward and backward fused, no
logits tensor); only the ``[B, T]`` reduction happens here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..logprobs import token_logprobs


@dataclass
class SequenceLogprobs:
    """``token`` [B, T] float32 per-token log-probs (0 where not ``valid``), ``valid`` [B, T] bool,
    ``sums`` [B] and ``counts`` [B] (valid tokens per row, float)."""

    token: torch.Tensor
    valid: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor

    def means(self) -> torch.Tensor:
        """Per-row mean log-prob (0 for a row without a valid token)."""
        return self.sums / self.counts.clamp(min=1.0)


def check_mask(loss_mask, shape, name="loss_mask"):
    if loss_mask is None:
        return None
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(loss_mask).__name__}")
    if tuple(loss_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} like targets, got {list(loss_mask.shape)}")
    return loss_mask.bool() if loss_mask.dtype != torch.bool else loss_mask


def sequence_token_logprobs(hidden, weight, targets, *, loss_mask=None, bias=None, temperature=1.0,
                            ignore_index=-100, backend="auto", vocab_parallel=None) -> SequenceLogprobs:
    """Per-token log-probs of ``targets`` [B, T] and their per-row sums (shared by every sequence loss)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got "
                         f"{list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(hidden.shape[:2]):
        got = list(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must have shape {list(hidden.shape[:2])} (hidden's [B, T]), got {got}")
    mask = check_mask(loss_mask, targets.shape)
    logp = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                          ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel)
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.to(valid.device)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    return SequenceLogprobs(logp, valid, logp.sum(-1), valid.sum(-1).to(logp.dtype))


def sequence_logprobs(hidden, weight, targets, *, loss_mask=None, average=False, bias=None,
                      temperature=1.0, ignore_index=-100, backend="auto", vocab_parallel=None) -> torch.Tensor:
    """``[B]`` float32 log-prob of each row's completion: the sum over valid tokens (``targets !=
    ignore_index`` and ``loss_mask``), or their mean with ``average=True`` (0 for a row without a valid
    token). ``hidden`` [B, T, H], ``weight`` [V, H], ``targets`` [B, T]. Differentiable with respect to
    ``hidden``, ``weight`` and ``bias`` through the fused kernel's backward. ``vocab_parallel``: a
    :class:`upg_kernels.VocabParallelOptions` when ``weight``/``bias`` are this rank's rows of a
    vocabulary-parallel head (see :func:`upg_kernels.token_logprobs`)."""
    s = sequence_token_logprobs(hidden, weight, targets, loss_mask=loss_mask, bias=bias,
                                temperature=temperature, ignore_index=ignore_index, backend=backend,
                                vocab_parallel=vocab_parallel)
    return s.means() if average else s.sums
