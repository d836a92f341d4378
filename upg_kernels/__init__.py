"""upg-kernels: fused post-training losses that never materialize vocab-sized logits.

- :func:`token_logprobs`: per-token log-probs (and entropy) from hidden states and the lm_head.
- :func:`unified_policy_loss` / :class:`UnifiedPolicyLoss` (and :func:`policy_loss_from_logprobs` for given
  per-token log-probs) with :class:`LossConfig` presets: SFT, RL
  and their hybrids as one estimator with four interchangeable parts.
- Drop-ins: :class:`FusedLinearGRPOLoss` (Liger), :func:`linear_cross_entropy` (Cut Cross-Entropy);
  TRL's GRPOTrainer via :mod:`upg_kernels.integrations.trl`.
"""
from .integrations import FusedLinearGRPOLoss, linear_cross_entropy
from .logprobs import token_logprobs
from .losses import (LossConfig, LossOutput, UnifiedPolicyLoss, group_advantages,
                     policy_loss_from_logprobs, unified_policy_loss)
from .reference import token_logprobs_reference

__version__ = "0.1.0"
__all__ = [
    "token_logprobs", "token_logprobs_reference",
    "LossConfig", "LossOutput", "UnifiedPolicyLoss", "group_advantages", "unified_policy_loss",
    "policy_loss_from_logprobs",
    "FusedLinearGRPOLoss", "linear_cross_entropy",
]
