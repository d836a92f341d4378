"""PPO's clipped value loss (Schulman et al. 2017; the OpenAI baselines / TRL / verl form)."""
from __future__ import annotations

import torch

from ..losses.aggregation import aggregation_weights
from .gae import check_bt, check_mask

VALUE_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def value_loss(values, old_values, returns, mask, clip_range=0.2, aggregation="token_mean"):
    """``(loss, metrics)``: ``l_t = 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``
    aggregated over the valid tokens (``aggregation`` as :class:`LossConfig`'s); ``clip_range=None``
    gives the unclipped ``0.5 (v - R)^2``. ``values`` [B, T] is differentiable; ``old_values`` and
    ``returns`` are constants (masked positions ignored, may be NaN). ``metrics``: python floats
    ``vf_loss``, ``vf_clipfrac`` (share of valid tokens where the clipped term is the larger),
    ``value_mean``, ``return_mean``, ``explained_variance`` (``1 - Var(R - v) / Var(R)``, NaN when
    ``Var(R) = 0``)."""
    check_bt("values", values)
    check_bt("old_values", old_values, values.shape)
    check_bt("returns", returns, values.shape)
    m = check_mask(mask, values.shape)
    if clip_range is not None and (isinstance(clip_range, bool) or not isinstance(clip_range, (int, float))
                                   or not clip_range > 0):
        raise ValueError(f"clip_range must be a number > 0 or None, got {clip_range!r}")
    if aggregation not in VALUE_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(VALUE_AGGREGATIONS)}, got {aggregation!r}")
    dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dt, device=values.device)
    v = torch.where(m, values.to(dt), zero)
    R = torch.where(m, returns.detach().to(dt), zero)
    unclipped = (v - R) ** 2
    if clip_range is None:
        per_tok, clipped_more = 0.5 * unclipped, torch.zeros_like(m)
    else:
        old = torch.where(m, old_values.detach().to(dt), zero)
        vc = old + (v - old).clamp(-clip_range, clip_range)
        clipped = (vc - R) ** 2
        per_tok, clipped_more = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    w = aggregation_weights(m, m.any(-1), aggregation, None, "value", dtype=dt)
    loss = (w * per_tok).sum()
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        vv, RR = v[m], R[m]
        var_R = RR.var(unbiased=False) if RR.numel() else zero
        ev = 1.0 - (RR - vv).var(unbiased=False) / var_R if float(var_R) > 0 else float("nan")
        metrics = {
            "vf_loss": float(loss.detach()),
            "vf_clipfrac": float((clipped_more & m).sum() / n),
            "value_mean": float(vv.mean()) if vv.numel() else 0.0,
            "return_mean": float(RR.mean()) if RR.numel() else 0.0,
            "explained_variance": float(ev),
        }
    return loss, metrics
