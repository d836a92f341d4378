"""``preference_loss``: pairwise preference losses (DPO family, SimPO, ORPO) on the fused kernel.

Layout (Liger's): a batch of ``2B`` rows, the first ``B`` chosen, the last ``B`` rejected, row ``i``
paired with row ``B + i``. Each formula lives once, in :func:`pair_losses`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import PreferenceConfig
from .sequence import sequence_token_logprobs


@dataclass
class PreferenceOutput:
    """``loss`` scalar (differentiable wrt hidden / weight / bias); per pair ``[B]``: ``chosen_logps``,
    ``rejected_logps`` (sums, or means with ``length_normalize``), ``chosen_rewards`` /
    ``rejected_rewards`` (``beta * s``, detached); ``metrics``: python floats."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict = field(default_factory=dict)


def log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(s_chosen, s_rejected, config: PreferenceConfig) -> torch.Tensor:
    """Per-pair losses ``[B]`` from the scores ``s`` (log-ratios, or log-probs without a reference)."""
    c = config
    if c.loss_type == "ipo":
        return (s_chosen - s_rejected - 1.0 / (2.0 * c.beta)) ** 2
    if c.loss_type == "orpo":
        log_odds = (s_chosen - s_rejected) - (log1mexp(s_chosen) - log1mexp(s_rejected))
        return -c.beta * F.logsigmoid(log_odds)
    z = c.beta * (s_chosen - s_rejected) - c.gamma
    if c.loss_type == "hinge":
        return torch.relu(1.0 - z)
    eps = c.label_smoothing
    if c.loss_type == "sigmoid":
        return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    # robust (Chowdhury et al. 2024): unbiased estimate of the clean loss under flip rate eps
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _resolve(config):
    if isinstance(config, str):
        return PreferenceConfig.preset(config)
    if isinstance(config, PreferenceConfig):
        return config
    raise TypeError(f"config must be a preset name or a PreferenceConfig, got {type(config).__name__}")


def _check_ref(ref, name, B, device, needed):
    if ref is None:
        if needed:
            raise ValueError(f"{name} is required: the config uses a reference model (use_reference=True); "
                             "pass the reference's per-sequence log-prob sums, shape [B]")
        return None
    if not needed:
        raise ValueError(f"{name} was given but the config is reference-free (use_reference=False)")
    if not isinstance(ref, torch.Tensor):
        ref = torch.as_tensor(ref)
    if tuple(ref.shape) != (B,):
        raise ValueError(f"{name} must have shape [B={B}] (one sum per pair), got {list(ref.shape)}")
    return ref.detach().to(device=device, dtype=torch.float32 if ref.dtype != torch.float64 else ref.dtype)


def _denominators(totals, B, n_chosen):
    """``(pairs, chosen tokens)`` the loss divides by: this call's, or the whole batch's ``totals``."""
    if totals is None:
        return B, n_chosen
    from ..losses.batch import BatchTotals
    if not isinstance(totals, BatchTotals):
        raise TypeError(f"totals must be a BatchTotals (upg_kernels.batch_totals), got {type(totals).__name__}")
    if not totals.paired:
        raise ValueError("preference_loss needs totals counted by pairs: batch_totals(mask, paired=True)")
    if B > totals.main_rows or int(n_chosen) > totals.main_tokens:
        raise ValueError(f"totals do not cover this call ({B} pairs and {int(n_chosen)} chosen tokens here, "
                         f"{totals.main_rows} and {totals.main_tokens} in totals): another batch's totals, "
                         "or a mask without ignore_index positions removed")
    return totals.main_rows, n_chosen.new_tensor(float(totals.main_tokens))


def preference_loss(hidden, weight, targets, *, config, ref_chosen_logps=None, ref_rejected_logps=None,
                    loss_mask=None, bias=None, temperature=1.0, ignore_index=-100,
                    backend="auto", vocab_parallel=None, totals=None) -> PreferenceOutput:
    """The pairwise preference loss of ``config`` (a preset name or :class:`PreferenceConfig`).

    Args:
        hidden: ``[2B, T, H]`` last hidden states; rows ``[:B]`` chosen, ``[B:]`` rejected.
        weight: ``[V, H]`` lm_head weight; ``bias`` optional ``[V]``.
        targets: ``[2B, T]`` next-token ids; ``ignore_index`` masks prompt and padding.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference per-sequence log-prob SUMS (e.g.
            :func:`sequence_logprobs` of the reference model, under no_grad); required iff
            ``config.use_reference``. With ``length_normalize`` they are divided by the same token counts.
        loss_mask: optional ``[2B, T]`` bool, ANDed with ``targets != ignore_index``.
        vocab_parallel: a :class:`upg_kernels.VocabParallelOptions` when ``weight``/``bias`` are this
            rank's rows of a vocabulary-parallel head (the loss is then the same on every rank).
        totals: the whole batch's counts, ``upg_kernels.batch_totals(mask, paired=True, group=...)`` of
            the micro-batches' masks (``mask = loss_mask & (targets != ignore_index)``): the pair mean
            divides by every pair of the batch and the NLL term by every chosen token, so micro-batch
            (and, with ``group``, per-rank) losses add up to the whole batch's; under DDP multiply the
            loss by ``totals.world_size`` before ``backward``. Default: this call's own counts.

    Every chosen and rejected row needs at least one valid target token.
    """
    cfg = _resolve(config)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must have shape [2B, T, H] (chosen rows then rejected rows)")
    if hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must hold an even, non-zero number of rows 2B (first B chosen, last B "
                         f"rejected), got {hidden.shape[0]}")
    B = hidden.shape[0] // 2
    seq = sequence_token_logprobs(hidden, weight, targets, loss_mask=loss_mask, bias=bias,
                                  temperature=temperature, ignore_index=ignore_index, backend=backend,
                                  vocab_parallel=vocab_parallel)
    empty = seq.counts == 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows[:8]} of the 2B={2 * B} chosen/rejected sequences have no valid target "
                         "token (targets != ignore_index and loss_mask); every completion needs one")
    ref_c = _check_ref(ref_chosen_logps, "ref_chosen_logps", B, hidden.device, cfg.use_reference)
    ref_r = _check_ref(ref_rejected_logps, "ref_rejected_logps", B, hidden.device, cfg.use_reference)

    norm = seq.counts if cfg.length_normalize else torch.ones_like(seq.counts)
    logps = seq.sums / norm
    chosen, rejected = logps[:B], logps[B:]
    s_c, s_r = chosen, rejected
    if cfg.use_reference:
        s_c = chosen - ref_c.to(chosen.dtype) / norm[:B]
        s_r = rejected - ref_r.to(chosen.dtype) / norm[B:]
    per_pair = pair_losses(s_c, s_r, cfg)
    n_pairs, n_chosen = _denominators(totals, B, seq.counts[:B].sum())
    nll = -seq.token[:B].sum() / n_chosen
    loss = per_pair.sum() / n_pairs + (cfg.nll_coef * nll if cfg.nll_coef else 0.0)

    r_c, r_r = (cfg.beta * s_c).detach(), (cfg.beta * s_r).detach()
    metrics = {
        "loss": float(loss.detach()),
        "preference_loss": float(per_pair.detach().mean()),
        "nll": float(nll.detach()),
        "reward_chosen": float(r_c.mean()),
        "reward_rejected": float(r_r.mean()),
        "reward_margin": float((r_c - r_r).mean()),
        "reward_accuracy": float((r_c > r_r).float().mean()),
        "logps_chosen": float(chosen.detach().mean()),
        "logps_rejected": float(rejected.detach().mean()),
    }
    if cfg.loss_type == "orpo":
        with torch.no_grad():
            log_odds = (s_c - s_r) - (log1mexp(s_c) - log1mexp(s_r))
        metrics["log_odds_ratio"] = float(F.logsigmoid(log_odds).mean())
        metrics["log_odds_chosen"] = float(log_odds.mean())
    return PreferenceOutput(loss, chosen, rejected, r_c, r_r, metrics)
