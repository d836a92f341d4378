"""Unified policy-gradient losses: every post-training loss as the four UPGE parts (docs/design.md §1)."""
from .advantages import group_advantages
from .batch import BatchTotals, LossBatch, batch_totals
from .config import PRESET_NAMES, PRESETS, LossConfig
from .module import UnifiedPolicyLoss
from .unified import LossOutput, policy_loss_from_logprobs, unified_policy_loss

__all__ = ["LossConfig", "PRESETS", "PRESET_NAMES", "group_advantages", "unified_policy_loss",
           "policy_loss_from_logprobs", "UnifiedPolicyLoss", "LossOutput", "LossBatch", "BatchTotals",
           "batch_totals"]
