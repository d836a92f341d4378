"""Aggregation of per-token losses: every mode is a weighted sum ``L = sum_t w_t * l_t``.

One definition of the weights serves both epilogues: the PyTorch one aggregates with them, the fused
Triton one receives them per token (docs/losses.md, "Aggregation").
"""
from __future__ import annotations

import torch

from ..parallel.comm import cp_sum, seq_sum


def aggregation_weights(tok, rows, mode, n_items, max_len, part, dtype=torch.float32, cp_group=None):
    """``w [B, T]`` (0 outside ``tok``) with ``L = sum(w * l)`` for aggregation ``mode`` over ``rows`` [B].

    ``tok`` is the [B, T] bool mask of the part's tokens, ``n_items`` the optional token_mean
    denominator (DAPO's ``num_items_in_batch``), ``max_len`` Dr.GRPO's ``L_max``, ``part`` the part's
    name for error messages. ``cp_group``: the context-parallel group holding the other parts of the
    same rows (token counts are summed over it; rows are the same on every rank of it)."""
    n_rows = rows.sum().clamp(min=1).to(dtype)
    B, T = tok.shape
    if mode == "token_mean":
        if n_items is not None:
            denom = torch.as_tensor(n_items, dtype=dtype, device=tok.device).clamp(min=1.0)
        else:
            denom = cp_sum(tok.sum().to(dtype), cp_group).clamp(min=1.0)
        w = (1.0 / denom).expand(B, T)
    elif mode == "seq_mean_token_mean":
        w = ((1.0 / n_rows) / seq_sum(tok.to(dtype), cp_group).clamp(min=1.0)).expand(B, T)
    elif mode == "seq_mean_token_sum":
        w = (1.0 / n_rows).expand(B, T)
    elif mode == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError(f"aggregation 'seq_mean_token_sum_norm' ({part} part) needs "
                             "config.max_completion_length (Dr.GRPO's L_max)")
        w = (1.0 / (n_rows * max_len)).expand(B, T)
    else:
        raise ValueError(f"unknown aggregation {mode!r}")
    return torch.where(tok, w, torch.zeros_like(w))
