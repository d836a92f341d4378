"""Capturable mode (``capturable=True``): the backends without host synchronization.

Normally the backends compact the rows that need work with ``nonzero`` (ignored targets in the
forward; zero coefficients or ignored targets in the backward, :func:`kernels.active_rows`) and drop
an entropy / lse term whose gradient is all zero (one ``any()`` each). Those read device values on the
host, which a CUDA graph cannot capture. With :attr:`LogprobParams.capturable` every row runs instead:

* forward (:func:`forward_rows`): every row is computed, gathering a valid column id at ignored rows;
  :func:`finish_forward` then sets their ``logp``, entropy and lse to 0 (``where``, so a non-finite
  value of an ignored row's hidden state cannot leak);
* backward (:func:`backward_rows`): every row runs, and a row that is not active contributes exactly
  0: its coefficients are set to 0, its hidden row to 0, its target to column 0 and its lse to
  :data:`INACTIVE_LSE` (so ``p = exp(z - lse) = 0`` and ``log p`` stays finite: ``dz = 0`` exactly, and
  a NaN in that hidden row cannot reach dW or other rows). The ``where`` on the hidden states is one
  O(N·H) copy; ``g_ent`` / ``g_lse`` are kept when given (their terms are computed even if all 0).

The cost: the work of all N rows (no skipping of zero-advantage rows), one ``[N, H]`` copy in the
backward. Out-of-range target ids are reported on the device (``upg_kernels.logprobs``: NaN outputs).
"""
from __future__ import annotations

import torch

# the lse of an inactive row in the capturable backward: exp(z - lse) underflows to 0 for any finite
# logit while z - lse stays finite in float32 (so p * (log p + H) is 0, never NaN)
INACTIVE_LSE = 1e30


def forward_rows(targets: torch.Tensor, p):
    """``(rows, gather_targets, valid)``: the rows the forward computes, target ids safe to gather,
    and the mask of valid rows (None outside capturable mode: the rows are compacted)."""
    valid = targets != p.ignore_index
    if not getattr(p, "capturable", False):
        from .meta import nonzero_rows
        return nonzero_rows(valid), targets, None
    rows = torch.arange(targets.shape[0], device=targets.device)
    return rows, torch.where(valid, targets, torch.zeros_like(targets)), valid


def finish_forward(outs, valid):
    """``outs`` with the rows outside ``valid`` set to 0 (nothing to do when ``valid`` is None)."""
    if valid is None:
        return tuple(outs)
    return tuple(torch.where(valid, x, torch.zeros_like(x)) for x in outs)


def backward_rows(hidden, targets, lse, ent, g_logp, g_ent, g_lse, p):
    """``(hidden, targets, lse, ent, rows, g_logp, g_ent, g_lse)`` for the backward. Outside capturable
    mode: :func:`kernels.active_rows` (compacted rows, inputs unchanged); in it: every row, with the
    inactive ones neutralized (module docstring)."""
    from .contract import active_rows
    if not getattr(p, "capturable", False):
        rows, g_logp, g_ent, g_lse = active_rows(targets, g_logp, g_ent, g_lse, p.ignore_index)
        return hidden, targets, lse, ent, rows, g_logp, g_ent, g_lse
    cd = torch.float64 if g_logp.dtype == torch.float64 else torch.float32
    g_logp = g_logp.to(cd)
    act = g_logp != 0
    extra = []
    for g in (g_ent, g_lse):
        if g is not None:
            g = g.to(cd)
            act = act | (g != 0)
        extra.append(g)
    act = act & (targets != p.ignore_index)

    def keep(x, fill=0.0):
        return None if x is None else torch.where(act, x, torch.full_like(x, fill)).contiguous()

    hidden = torch.where(act[:, None], hidden, torch.zeros_like(hidden))
    targets = torch.where(act, targets, torch.zeros_like(targets)).contiguous()
    lse = keep(lse, INACTIVE_LSE)
    ent = keep(ent)
    rows = torch.arange(targets.shape[0], device=targets.device)
    return hidden, targets, lse, ent, rows, keep(g_logp), keep(extra[0]), keep(extra[1])
