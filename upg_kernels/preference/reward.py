"""Bradley-Terry reward-model loss (Ouyang et al. 2022; TRL RewardTrainer.compute_loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_reward_loss(chosen, rejected, margin=None, center_coef=0.0):
    """``mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)``.

    ``chosen`` / ``rejected``: ``[B]`` (or ``[B, 1]``) scalar rewards of the pair's two completions;
    ``margin``: optional ``[B]`` (Llama-2's preference-strength margin); ``center_coef``: TRL's
    ``center_rewards_coefficient`` (Eisenstein et al. 2023), 0 = off."""
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating torch.Tensor of rewards")
    if chosen.dim() == 2 and chosen.shape[1] == 1:
        chosen = chosen[:, 0]
    if rejected.dim() == 2 and rejected.shape[1] == 1:
        rejected = rejected[:, 0]
    if chosen.dim() != 1 or tuple(rejected.shape) != tuple(chosen.shape):
        raise ValueError(f"chosen and rejected must both have shape [B] (or [B, 1]), got "
                         f"{list(chosen.shape)} and {list(rejected.shape)}")
    if chosen.shape[0] == 0:
        raise ValueError("chosen and rejected are empty (B = 0)")
    diff = chosen - rejected
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        if margin.dim() == 2 and margin.shape[1] == 1:
            margin = margin[:, 0]
        if margin.dim() > 1 or (margin.dim() == 1 and margin.shape[0] != chosen.shape[0]):
            raise ValueError(f"margin must be a number or have shape [B={chosen.shape[0]}], "
                             f"got {list(margin.shape)}")
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss
