"""The training methods of ``upg-train``, one class each (``base.Method``), and their registry.

``METHODS`` is the one list of method names: ``cli.py`` makes a sub-command of each, ``config.py``
takes their config defaults and checks, and ``Trainer`` runs the one named by ``cfg.command``.
Adding a method: one new module here with a ``Method`` subclass, one entry below, and its test
(CONTRIBUTING.md, "Adding a trainer method").
"""
from __future__ import annotations

from .base import Method
from .dpo import DPO
from .eval import Eval
from .grpo import GRPO
from .hpt import HPT
from .ppo import PPO
from .rm import RM
from .sft import SFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (SFT, GRPO, HPT, RM, DPO, PPO, Eval)}
TRAIN_METHODS = tuple(name for name, m in METHODS.items() if m.trains)


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown upg-train method {name!r}; methods are {list(METHODS)}") from None


__all__ = ["METHODS", "TRAIN_METHODS", "Method", "get_method"]
