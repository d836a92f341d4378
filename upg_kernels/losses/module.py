"""``UnifiedPolicyLoss``: the ``nn.Module`` form of :func:`unified_policy_loss`."""
from __future__ import annotations

import torch

from .config import LossConfig
from .unified import LossOutput, unified_policy_loss


class UnifiedPolicyLoss(torch.nn.Module):
    """``UnifiedPolicyLoss(config)(hidden, weight, targets, batch=None, **kw) -> LossOutput``.

    ``batch``: a :class:`LossBatch` (or its fields as keyword arguments), as for
    :func:`unified_policy_loss`.

    ``config`` is a :class:`LossConfig` or a preset name; ``overrides`` apply to a preset name.
    ``backend`` and ``temperature`` set defaults for every call (a call may override them).
    """

    def __init__(self, config="grpo", *, backend="auto", temperature=1.0, **overrides):
        super().__init__()
        if isinstance(config, str):
            config = LossConfig.preset(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig or a preset name, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        self.temperature = temperature

    def forward(self, hidden, weight, targets, batch=None, **kw) -> LossOutput:
        kw.setdefault("backend", self.backend)
        kw.setdefault("temperature", self.temperature)
        return unified_policy_loss(hidden, weight, targets, config=self.config, batch=batch, **kw)

    def extra_repr(self) -> str:
        return repr(self.config)
