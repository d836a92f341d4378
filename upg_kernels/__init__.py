"""upg-kernels: fused post-training losses that never materialize vocab-sized logits.

- :func:`token_logprobs`: per-token log-probs (and entropy) from hidden states and the lm_head
  (:class:`VocabParallelOptions` for a vocabulary-parallel head, ``cp_group=`` on the losses for context
  parallelism: :mod:`upg_kernels.parallel`).
- :func:`unified_policy_loss` / :class:`UnifiedPolicyLoss` (and :func:`policy_loss_from_logprobs` for given
  per-token log-probs) with :class:`LossConfig` presets: SFT, RL
  and their hybrids as one estimator with four interchangeable parts; the per-token / per-row inputs
  as one :class:`LossBatch`, and :func:`batch_totals` (global counts: micro-batches and ranks add up
  to the whole batch).
- :func:`preference_loss` with :class:`PreferenceConfig` presets (DPO, cDPO, RPO, IPO, hinge, robust,
  SimPO, ORPO), :func:`sequence_logprobs`, :func:`pairwise_reward_loss` (Bradley-Terry RM).
- PPO with a critic: :func:`gae`, :func:`value_loss`, :func:`kl_penalty_rewards`,
  :class:`AdaptiveKLController` / :class:`FixedKLController`, :func:`whiten`.
- Drop-ins: :class:`FusedLinearGRPOLoss` (Liger), :func:`linear_cross_entropy` (Cut Cross-Entropy);
  TRL's GRPOTrainer via :mod:`upg_kernels.integrations.trl`.
"""
from .integrations import FusedLinearGRPOLoss, linear_cross_entropy
from .logprobs import token_logprobs
from .parallel import VocabParallelOptions
from .losses import (BatchTotals, LossBatch, LossConfig, LossOutput, UnifiedPolicyLoss, batch_totals,
                     group_advantages, policy_loss_from_logprobs, unified_policy_loss)
from .ppo import AdaptiveKLController, FixedKLController, gae, kl_penalty_rewards, value_loss, whiten
from .preference import (PREFERENCE_PRESETS, PreferenceConfig, PreferenceOutput, pairwise_reward_loss,
                         preference_loss, sequence_logprobs)
from .reference import token_logprobs_reference

__version__ = "0.1.0"
__all__ = [
    "token_logprobs", "token_logprobs_reference", "VocabParallelOptions",
    "LossConfig", "LossOutput", "UnifiedPolicyLoss", "group_advantages", "unified_policy_loss",
    "policy_loss_from_logprobs", "LossBatch", "BatchTotals", "batch_totals",
    "FusedLinearGRPOLoss", "linear_cross_entropy",
    "PreferenceConfig", "PREFERENCE_PRESETS", "PreferenceOutput", "preference_loss", "sequence_logprobs",
    "pairwise_reward_loss",
    "gae", "whiten", "value_loss", "kl_penalty_rewards", "AdaptiveKLController", "FixedKLController",
]
