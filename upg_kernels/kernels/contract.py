"""The contract every backend of :mod:`upg_kernels.kernels` implements (triton-free, imports no backend).

Two host functions over flat inputs:

``forward(hidden [N,H], weight [V,H], bias [V]|None, targets [N] int64, params)``
    -> ``(logp [N] f32, entropy [N] f32, lse [N] f32)``

``backward(hidden, weight, bias, targets, lse, entropy, g_logp [N] f32, g_ent [N] f32|None, params,
           need_hidden, need_weight, need_bias, g_lse=None)``
    -> ``(dhidden [N,H] | None, dweight [V,H] | None, dbias [V] | None)`` in the inputs' dtypes.

with ``z = softcap(hidden @ weight.T + bias) / temperature``, ``lse = logsumexp(z)``,
``logp = z[target] - lse`` and ``entropy = lse - sum(p * z)``. Rows whose target is
``ignore_index`` give 0 for all three and get no gradient. The backward forms
``dz = g_logp * onehot - (g_logp - g_lse) * p - g_ent * p * (log p + H)`` (then ``/ temperature`` and
the softcap chain rule), and skips rows whose ``g_logp``, ``g_ent`` and ``g_lse`` are all 0 exactly
(:func:`active_rows`). float64 inputs give float64 outputs (backends that take float64).

The compute dtype is ``hidden``'s. ``weight`` has it too, except under autocast: a float32 weight with
bf16/fp16 hidden states (``workspace.keeps_weight``) is passed as it is, and the backend must never cast
it whole: each W tile / slab is cast to ``hidden``'s dtype where it is used (Triton: in registers,
``triton_logprobs_common.operand``; host GEMMs: ``workspace.WeightSlabs``, one bounded slab at a time),
and ``dweight`` comes back in float32 (the weight's dtype). The bias is always in ``hidden``'s dtype.

The backends themselves are rows of the table in :mod:`upg_kernels.kernels.backends`. Backend modules
import what they share from here (never from the table or the package), so the table may import them
lazily without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .meta import any_true, nonzero_rows


@dataclass(frozen=True)
class LogprobParams:
    temperature: float = 1.0
    ignore_index: int = -100
    softcap: float = 0.0        # 0 = no final-logit softcapping
    filter_eps: float = 0.0     # backward tile filter (Triton only); 0 = exact
    capturable: bool = False    # no host synchronization: every row runs (kernels/capturable.py)


def active_rows(targets, g_logp, g_ent, g_lse, ignore_index):
    """The rows the backward must run, and the coefficient vectors it needs.

    Returns ``(rows int64 [M], g_logp f32, g_ent f32 | None, g_lse f32 | None)``: rows whose target is
    not ``ignore_index`` and whose ``g_logp``, ``g_ent`` or ``g_lse`` is non-zero (exact); ``g_ent`` /
    ``g_lse`` come back as None when they are all zero (autograd hands zeros for unused outputs), so
    the kernels drop their terms."""
    cd = torch.float64 if g_logp.dtype == torch.float64 else torch.float32
    g_logp = g_logp.to(cd).contiguous()
    active = g_logp != 0
    extra = []
    for g in (g_ent, g_lse):
        if g is not None:
            g = g.to(cd).contiguous()
            nz = g != 0
            if any_true(nz):
                active |= nz
            else:
                g = None
        extra.append(g)
    active &= targets != ignore_index
    return nonzero_rows(active), g_logp, extra[0], extra[1]


def zero_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    """``(dh, dw, db, need_bias)``: zero-filled outputs for what is asked (None otherwise) in the
    inputs' dtypes; ``need_bias`` is False without a bias."""
    dev = hidden.device
    need_bias = bool(need_bias) and bias is not None
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_weight else None
    db = torch.zeros(weight.shape[0], dtype=bias.dtype, device=dev) if need_bias else None
    return dh, dw, db, need_bias
