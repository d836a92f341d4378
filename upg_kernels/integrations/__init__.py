"""Drop-ins for existing trainers (docs/integrations.md).

* :class:`FusedLinearGRPOLoss`: Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` interface on
  :func:`upg_kernels.unified_policy_loss`.
* :func:`patch_grpo_trainer` / :func:`patch_dpo_trainer`: make a TRL ``GRPOTrainer`` / ``DPOTrainer`` compute
  log-probs/entropies with upg-kernels (module :mod:`upg_kernels.integrations.trl`; importing it does not
  import TRL).
* :func:`linear_cross_entropy`: Cut Cross-Entropy's calling convention on :func:`upg_kernels.token_logprobs`.
* :mod:`upg_kernels.integrations.verl`: a verl plugin (loaded by verl itself; not imported here).
"""
from .cce import LinearCrossEntropy, linear_cross_entropy
from .liger import FusedLinearGRPOLoss, LigerSettings, liger_loss_config
from .trl import patch_dpo_trainer, patch_grpo_trainer, unpatch_dpo_trainer, unpatch_grpo_trainer

__all__ = ["FusedLinearGRPOLoss", "LigerSettings", "liger_loss_config", "linear_cross_entropy",
           "LinearCrossEntropy", "patch_grpo_trainer", "unpatch_grpo_trainer", "patch_dpo_trainer",
           "unpatch_dpo_trainer"]
