"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay to ``min_lr_ratio``."""
from __future__ import annotations

import math

import torch


def lr_lambda(kind: str, total: int, warmup: int = 0, min_ratio: float = 0.0):
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}: use constant, linear or cosine")

    def f(i: int) -> float:  # i = number of optimizer updates done so far
        if warmup > 0 and i < warmup:
            return (i + 1) / warmup
        if kind == "constant":
            return 1.0
        span = max(1, total - warmup)
        frac = min(1.0, max(0.0, (i - warmup) / span))
        if kind == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - frac)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def make_scheduler(optimizer, kind: str, total: int, warmup: int = 0, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total, warmup, min_ratio))
