"""Drop-ins for existing trainers (docs/integrations.md).

* :class:`FusedLinearGRPOLoss`: Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` interface on
  :func:`upg_kernels.unified_policy_loss`.
* :func:`patch_grpo_trainer`: make a TRL ``GRPOTrainer`` compute log-probs/entropies with upg-kernels
  (module :mod:`upg_kernels.integrations.trl`; importing it does not import TRL).
* :func:`linear_cross_entropy`: Cut Cross-Entropy's calling convention on :func:`upg_kernels.token_logprobs`.
"""
from .cce import LinearCrossEntropy, linear_cross_entropy
from .liger import FusedLinearGRPOLoss, liger_loss_config
from .trl import patch_grpo_trainer, unpatch_grpo_trainer

__all__ = ["FusedLinearGRPOLoss", "liger_loss_config", "linear_cross_entropy", "LinearCrossEntropy",
           "patch_grpo_trainer", "unpatch_grpo_trainer"]
