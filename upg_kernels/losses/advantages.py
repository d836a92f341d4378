"""Group-relative advantages from per-rollout rewards (GRPO, Dr.GRPO, RLOO, batch std).

Groups are the G rollouts of one prompt: either ``group_size`` (consecutive blocks of G rows) or
``group_ids`` (an integer label per row; groups need not be contiguous nor equal in size).
A group whose rewards are all equal gets advantage exactly 0 (never NaN, never a rounding
residue): its tokens then carry a zero gradient coefficient and the kernel skips them.

NaN / inf policy: a non-finite reward raises ``ValueError`` (naming the first bad row) rather than
silently zeroing or poisoning its group. Filter such rollouts out before calling.
"""
from __future__ import annotations

import torch

MODES = ("mean_std", "mean", "rloo", "batch_std")


def _group_index(B, group_size, group_ids, device):
    """(inverse [B] int64 group index, number of groups)."""
    if group_size is None and group_ids is None:
        raise ValueError("group_advantages needs group_size or group_ids to know the groups of rewards")
    if group_size is not None and group_ids is not None:
        raise ValueError("pass either group_size or group_ids, not both")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if B % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the batch of {B} rewards")
        inv = torch.arange(B, device=device) // group_size
        return inv, B // group_size
    if not isinstance(group_ids, torch.Tensor):
        group_ids = torch.as_tensor(group_ids)
    if group_ids.dtype.is_floating_point or group_ids.is_complex():
        raise ValueError(f"group_ids must hold integer labels, got dtype {group_ids.dtype}")
    if tuple(group_ids.shape) != (B,):
        raise ValueError(f"group_ids must have shape [B={B}] like rewards, got {tuple(group_ids.shape)}")
    _, inv = torch.unique(group_ids.to(device), return_inverse=True)
    return inv, int(inv.max()) + 1 if B else 0


def _batch_std(r, group):
    """Unbiased std of the float64 rewards ``r``, over every rank of ``group`` when given (two small
    all-reduces: count and sum, then the squared deviations from the global mean)."""
    if group is None:
        return r.std() if r.shape[0] > 1 else r.new_zeros(())
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group_advantages(group=...) needs an initialized torch.distributed process group")
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else r.device
    t = torch.stack([r.new_tensor(float(r.shape[0])), r.sum()]).to(dev)
    dist.all_reduce(t, group=group)
    n, mean = t[0], t[1] / t[0].clamp(min=1)
    sq = ((r.to(dev) - mean) ** 2).sum().reshape(1)
    dist.all_reduce(sq, group=group)
    return torch.sqrt(sq[0] / (n - 1)).to(r.device) if float(n) > 1 else r.new_zeros(())


def group_advantages(rewards, *, group_size=None, group_ids=None, mode="mean_std", eps=1e-4, group=None):
    """Per-rollout advantages ``[B]`` from rewards ``[B]``.

    **Compute advantages before splitting** a batch into micro-batches or ranks: every group's rows must
    be in ``rewards`` (a partial group silently gets other advantages), then pass the result as the
    loss's ``advantages``. ``group``: a ``torch.distributed`` process group whose ranks each hold whole
    groups of one batch: ``"batch_std"`` then divides by the std over every rank's rewards (the other
    modes are per group, hence already exact per rank).

    Modes (``R`` a group's rewards, ``G`` its size):

    - ``"mean_std"`` (GRPO): ``(R - mean(R)) / (std(R) + eps)``, unbiased std (``G - 1``); a
      group of one gets 0.
    - ``"mean"`` (Dr.GRPO): ``R - mean(R)``.
    - ``"rloo"``: ``G/(G-1) * (R - mean(R))`` = R minus the mean of the other rollouts; needs G >= 2.
    - ``"batch_std"``: ``(R - mean(R)) / (std over the whole batch + eps)`` (TRL ``scale_rewards="batch"``).

    Groups with all rewards equal give exactly 0. Computed in float64, returned in the rewards'
    floating dtype (float32 for integer/bool rewards).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise ValueError("rewards must be real")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.detach().to(torch.float64)
    B = r.shape[0]
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        raise ValueError(f"rewards holds a non-finite value {float(r[i])} at row {i}; "
                         "filter such rollouts out (NaN/inf rewards are rejected, not zeroed)")
    inv, ng = _group_index(B, group_size, group_ids, r.device)
    if group is not None and mode == "batch_std":
        std_all = _batch_std(r, group)      # every rank joins the collectives, even with B = 0
    if B == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    zeros = torch.zeros(ng, dtype=torch.float64, device=r.device)
    cnt = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / cnt
    gmax = torch.full((ng,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, inv, r, reduce="amax")
    gmin = torch.full((ng,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, inv, r, reduce="amin")
    equal = (gmax == gmin)[inv]
    centered = r - mean[inv]
    G = cnt[inv]
    if mode == "mean":
        adv = centered
    elif mode == "rloo":
        if bool((cnt < 2).any()):
            g = int((cnt < 2).nonzero()[0, 0])
            raise ValueError(f"mode='rloo' needs at least 2 rollouts per group; group {g} has 1")
        adv = centered * G / (G - 1)
    elif mode == "mean_std":
        var = zeros.index_add(0, inv, centered * centered)
        std = torch.sqrt(var / (cnt - 1).clamp(min=1))
        adv = centered / (std[inv] + eps)
    else:  # batch_std
        std = std_all if group is not None else _batch_std(r, None)
        adv = centered / (std + eps)
    adv = torch.where(equal, torch.zeros_like(adv), adv)
    return adv.to(out_dtype)
