"""RLHF-PPO with a critic: GAE, the clipped value loss, KL-in-reward and its controllers, whitening
(docs/losses.md, "Preference, reward and value losses")."""
from .gae import gae, reverse_linear_scan, whiten
from .kl import AdaptiveKLController, FixedKLController, kl_penalty_rewards
from .value import value_loss

__all__ = ["gae", "whiten", "reverse_linear_scan", "value_loss", "kl_penalty_rewards",
           "AdaptiveKLController", "FixedKLController"]
