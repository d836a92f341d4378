"""KL-in-reward for RLHF-PPO (Ziegler et al. 2019; Stiennon et al. 2020) and its beta controllers."""
from __future__ import annotations

import torch

from ..losses.config import KL_TYPES
from ..losses.epilogue import kl_estimate
from .gae import check_bt, check_mask


def kl_penalty_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_type="k1"):
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl_t`` on valid tokens, plus ``scores[b]`` at row b's
    last valid token. ``kl_t`` is the estimator ``kl_type`` of ``d = logprobs - ref_logprobs`` (k1 =
    ``d``, k2 = ``d^2/2``, k3 = ``exp(-d) + d - 1``; as in :class:`LossConfig`). 0 at masked positions;
    a row without a valid token is all 0 (its score has no token to land on). Detached, float32."""
    check_bt("logprobs", logprobs)
    check_bt("ref_logprobs", ref_logprobs, logprobs.shape)
    m = check_mask(mask, logprobs.shape)
    B, T = logprobs.shape
    scores = torch.as_tensor(scores, device=logprobs.device)
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (B,):
        raise ValueError(f"scores must have shape [B={B}] (one score per row), got {list(scores.shape)}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {list(KL_TYPES)}, got {kl_type!r}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    dt = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        zero = torch.zeros((), dtype=dt, device=logprobs.device)
        d = torch.where(m, logprobs.to(dt) - ref_logprobs.to(dt), zero)
        rewards = torch.where(m, -kl_coef * kl_estimate(d, kl_type), zero)
        last = (T - 1) - torch.flip(m, dims=[1]).to(torch.int8).argmax(dim=1)
        has = m.any(dim=1)
        rewards[torch.arange(B, device=m.device), last] += torch.where(has, scores.to(dt), zero)
    return rewards


class FixedKLController:
    """A constant KL coefficient with the :class:`AdaptiveKLController` interface."""

    def __init__(self, kl_coef: float):
        if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or kl_coef < 0:
            raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019) Sec. 2.2: ``e = clip(KL / target - 1, -0.2, 0.2)``,
    ``beta <- beta (1 + e * n_steps / horizon)``; ``n_steps`` = samples (or steps) since the last update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        super().__init__(init_kl_coef)
        for name, v in (("target", target), ("horizon", horizon)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value
