"""Codes and parameters of the fused loss epilogue, without triton (the host side imports them).

The kernel itself is in ``triton_epilogue``; ``losses/fused.py`` builds :class:`EpilogueParams` from a
``LossConfig`` and must import on machines without triton.
"""
from __future__ import annotations

from dataclasses import dataclass

STABILIZATION_CODES = {"none": 0, "clip": 1, "cispo": 2, "sapo": 3}
REFERENCE_CODES = {"current": 0, "old": 1, "one": 2, "shaped": 3}
LIKELIHOOD_CODES = {"logp": 0, "dft": 1, "chi2": 2, "hellinger": 3}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
ROLLOUT_CODES = {None: 0, "token_truncate": 1, "token_mask": 2}
# per-token part codes (int8)
PART_NONE, PART_MAIN, PART_DEMO_SFT, PART_DEMO_SHAPED = 0, 1, 2, 3
FLAG_LOW, FLAG_HIGH, FLAG_DUAL = 1, 2, 4


@dataclass(frozen=True)
class EpilogueParams:
    """The token-local part of a :class:`upg_kernels.LossConfig`, as kernel codes and scalars."""
    stabilization: int = 0
    reference: int = 0
    likelihood: int = 0
    kl_type: int = 3
    rollout_is: int = 0
    kl_bias_correction: bool = False
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float = 0.0           # 0 = no delta
    dual_clip: float = 0.0       # 0 = no dual clip
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    log_cap: float = 0.0         # log(rollout_is_cap)
    fdiv_beta: float = 0.1
    shaping_gamma: float = 0.1
    rl_coef: float = 1.0
    demo_coef: float = 1.0
