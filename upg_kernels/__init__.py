"""upg-kernels: fused post-training losses that never materialize vocab-sized logits."""
from .logprobs import token_logprobs
from .reference import token_logprobs_reference
from .losses import LossConfig, LossOutput, UnifiedPolicyLoss, group_advantages, unified_policy_loss

__version__ = "0.1.0"
__all__ = ["token_logprobs", "token_logprobs_reference"]
__all__ += ["LossConfig", "LossOutput", "UnifiedPolicyLoss", "group_advantages", "unified_policy_loss"]
from .integrations import FusedLinearGRPOLoss, linear_cross_entropy  # noqa: E402  (drop-ins: Liger, CCE)
__all__ += ["FusedLinearGRPOLoss", "linear_cross_entropy"]
