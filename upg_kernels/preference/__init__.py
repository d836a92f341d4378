"""Preference and reward-model losses: DPO family, SimPO, ORPO (fused sequence log-probs) and the
Bradley-Terry pairwise reward loss (docs/losses.md, "Preference, reward and value losses")."""
from .config import PREFERENCE_PRESET_NAMES, PREFERENCE_PRESETS, PreferenceConfig
from .loss import PreferenceOutput, pair_losses, preference_loss
from .reward import pairwise_reward_loss
from .sequence import sequence_logprobs

__all__ = ["PreferenceConfig", "PREFERENCE_PRESETS", "PREFERENCE_PRESET_NAMES", "PreferenceOutput",
           "preference_loss", "pair_losses", "pairwise_reward_loss", "sequence_logprobs"]
