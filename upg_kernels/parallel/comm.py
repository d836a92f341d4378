"""Collectives of the parallel paths: one owner for every reduction across ranks.

``cp_sum(x, group)`` is THE reduction of the context-parallel (CP) path: every sequence-level quantity of
the losses (per-row token counts, the GSPO/LUSPO sequence log-ratio, VESPO's sum, sequence-level IS, the
demo-part counts, the metrics) goes through it, so a future reduction cannot forget CP. It is an
autograd-aware all-reduce (SUM): the backward all-reduces the incoming gradient too, which is the exact
derivative of ``sum over ranks of each rank's loss`` when every rank's loss reads the reduced value.
With ``group=None`` it is the identity (no process group, no cost).
"""
from __future__ import annotations

import torch


def _dist():
    import torch.distributed as dist
    return dist


def group_size(group) -> int:
    """World size of ``group`` (1 for ``None``)."""
    return 1 if group is None else _dist().get_world_size(group)


def check_group(group, name: str):
    """``group`` must be None or a process group of an initialized default group."""
    if group is None:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name} was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first, or pass None)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(group).__name__}")
    return group


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        _dist().all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        _dist().all_reduce(g, group=ctx.group)
        return g, None


def cp_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over the ranks of ``group`` (identity for ``None``); differentiable (the backward
    all-reduces the gradient). Every rank must call it in the same order with the same shape."""
    if group is None:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(x, group)
    y = x.detach().clone()
    _dist().all_reduce(y, group=group)
    return y


def seq_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Per-row sum over the last (token) dimension, keepdim, completed over the context-parallel ranks
    that hold the other parts of the same rows: ``[B, T_local] -> [B, 1]``."""
    return cp_sum(x.sum(-1, keepdim=True), group)


def cp_min_max(lo: torch.Tensor, hi: torch.Tensor, group):
    """``(min over ranks of lo, max over ranks of hi)`` (detached), one all-reduce (MAX of ``[-lo, hi]``)."""
    if group is None:
        return lo, hi
    v = torch.stack([-lo.detach().reshape(()), hi.detach().reshape(())])
    _dist().all_reduce(v, op=_dist().ReduceOp.MAX, group=group)
    return -v[0], v[1]
