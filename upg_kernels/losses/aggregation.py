"""Aggregation of per-token losses: every mode is a weighted sum ``L = sum_t w_t * l_t``.

One definition of the weights serves both epilogues: the PyTorch one aggregates with them, the fused
Triton one receives them per token (docs/losses.md, "Aggregation"). With global totals
(:func:`upg_kernels.batch_totals`) the denominators are those of the whole batch.
"""
from __future__ import annotations

import torch

from ..parallel.comm import cp_sum, seq_sum


def aggregation_weights(tok, rows, mode, max_len, part, *, n_tokens=None, n_rows=None,
                        dtype=torch.float32, cp_group=None):
    """``w [B, T]`` (0 outside ``tok``) with ``L = sum(w * l)`` for aggregation ``mode`` over ``rows`` [B].

    ``tok`` is the [B, T] bool mask of the part's tokens, ``max_len`` Dr.GRPO's ``L_max``, ``part`` the
    part's name for error messages. ``n_tokens`` / ``n_rows``: the token_mean / sequence-mean
    denominators when they are not this call's own counts (global totals, ``num_items_in_batch``).
    ``cp_group``: the context-parallel group holding the other parts of the same rows (token counts are
    summed over it; rows are the same on every rank of it)."""
    if n_rows is None:
        n_rows = rows.sum().clamp(min=1).to(dtype)
    else:
        n_rows = torch.as_tensor(n_rows, dtype=dtype, device=tok.device).clamp(min=1.0)
    B, T = tok.shape
    if mode == "token_mean":
        if n_tokens is not None:
            denom = torch.as_tensor(n_tokens, dtype=dtype, device=tok.device).clamp(min=1.0)
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


def part_weights(cfg, inp, part, dtype=torch.float32):
    """The aggregation weights of ``part`` (``"main"`` or ``"demo"``) of a loss call: its tokens, rows
    and mode, divided by the call's counts, or by ``inp.totals`` (global counts) /
    ``inp.num_items`` (the main token_mean denominator) when given."""
    t = inp.totals
    if part == "main":
        tok, rows, mode = inp.main_tok, inp.main_rows, cfg.aggregation
        n_tok = inp.num_items if inp.num_items is not None else (t.main_tokens if t else None)
        n_rows = t.main_rows if t else None
    else:
        tok, rows = inp.demo_tok, inp.demo_rows
        mode = cfg.demo_aggregation if cfg.demo_part == "sft" else cfg.aggregation
        n_tok, n_rows = (t.demo_tokens, t.demo_rows) if t else (None, None)
    return aggregation_weights(tok, rows, mode, cfg.max_completion_length, part, n_tokens=n_tok,
                               n_rows=n_rows, dtype=dtype, cp_group=inp.cp_group)
