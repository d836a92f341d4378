"""The inputs of one loss call as one object (:class:`LossBatch`) and the global counts that every
aggregation divides by (:class:`BatchTotals`, :func:`batch_totals`).

:class:`LossBatch` is the one owner of the per-token and per-row arguments of
:func:`upg_kernels.unified_policy_loss`, :func:`upg_kernels.policy_loss_from_logprobs` and
:class:`upg_kernels.UnifiedPolicyLoss`: those take ``batch=LossBatch(...)`` or the same fields as keyword
arguments (shorthand), never both for one field.

:func:`batch_totals` counts, once over the whole batch of an optimizer step (every micro-batch, every
rank of the data-parallel ``group``, and, under context parallelism, the token positions that the ranks
of ``cp_group`` hold of the same rows), the main and demonstration tokens and rows and the group sizes.
Passed as ``totals=`` to every micro-batch's loss call, the aggregations divide by those global counts
instead of the call's own, so the micro-batch losses (and gradients) add up to the loss of the whole
batch in one call; under DDP multiply each rank's loss by the number of ranks its gradient reduction
averages over (``totals.world_size``, or ``world_size * cp_size`` when the reduction spans the
context-parallel ranks too) before ``backward``. docs/distributed.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..parallel.comm import check_group, group_size


@dataclass(frozen=True)
class BatchTotals:
    """Counts over the whole (global) batch of one optimizer step, from :func:`batch_totals`.

    ``main_tokens`` / ``demo_tokens``: tokens in the loss (``loss_mask`` nonzero) of the main / the
    demonstration (``is_demo``) rows; ``main_rows`` / ``demo_rows``: rows of each part, including rows
    whose mask is all zero (the aggregations count every row of a part; a row split over a
    context-parallel group counts once); ``world_size``: the size of the data-parallel ``group``, the
    processes holding different rows (1 without a group); ``cp_size``: the size of the context-parallel
    group whose ranks hold parts of the same rows (1 without one; the loss calls then need that
    ``cp_group``). Under DDP / FSDP the loss is multiplied by the number of ranks the gradient
    reduction averages over: ``world_size`` when it runs over the data-parallel group, ``world_size *
    cp_size`` when it runs over every data- and context-parallel rank (docs/distributed.md). ``paired``: counted for
    :func:`upg_kernels.preference_loss` (rows ``[:B]`` chosen: ``main_rows`` = pairs, ``main_tokens`` =
    chosen tokens). ``group_ids`` / ``group_counts``: with ``batch_totals(..., group_ids=...)``, every
    group label of the whole batch and its number of rows (the loss then checks that each call holds
    whole groups).
    """
    main_tokens: int
    demo_tokens: int = 0
    main_rows: int = 0
    demo_rows: int = 0
    world_size: int = 1
    paired: bool = False
    group_ids: Optional[tuple] = None
    group_counts: Optional[tuple] = None
    cp_size: int = 1

    def __post_init__(self):
        for n in ("main_tokens", "demo_tokens", "main_rows", "demo_rows"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"BatchTotals.{n} must be an int >= 0, got {v!r}")
        for n in ("world_size", "cp_size"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BatchTotals.{n} must be an int >= 1, got {v!r}")

    def group_count(self) -> dict:
        """``{group label: rows of the whole batch}`` (empty without ``group_ids``)."""
        return dict(zip(self.group_ids or (), self.group_counts or ()))


def _as_list(x, name):
    if x is None or isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{name} must be a tensor, a list of tensors (one per micro-batch) or None, "
                    f"got {type(x).__name__}")


def _all_reduce(t: torch.Tensor, group, device) -> torch.Tensor:
    """``t`` (float64, CPU) summed over ``group``, on ``device`` (a CUDA device for NCCL)."""
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = t.to(device)
    dist.all_reduce(t, group=group)
    return t.cpu()


def batch_totals(loss_mask, *, is_demo=None, group=None, cp_group=None, group_ids=None, paired: bool = False
                 ) -> BatchTotals:
    """The :class:`BatchTotals` of a whole batch: one call per optimizer step, before splitting.

    Args:
        loss_mask: the batch's ``[B, T]`` mask (nonzero = in the loss; flat ``[N]`` = N rows of one
            token), or a list of them, one per micro-batch (lengths may differ). It must already exclude
            the positions whose target is ``ignore_index``: the loss checks that it does. Under context
            parallelism: this rank's ``[B, T_local]`` columns of the rows.
        is_demo: ``[B]`` demonstration flags (or a list, like ``loss_mask``); None = all main rows.
        group: the data-parallel ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``),
            whose ranks hold different rows: the counts are all-reduced over it and ``world_size`` is its
            size. None: this process's rows only.
        cp_group: the context-parallel group whose ranks hold other token positions of the same rows (as
            passed to the losses' ``cp_group=``): the token counts are summed over it and each row is
            counted once; every rank of it must pass the same rows (row counts and ``is_demo`` per
            micro-batch; checked by count). ``cp_size`` is its size. The loss calls must then pass the
            same ``cp_group``. Not with ``paired``.
        group_ids: ``[B]`` group labels of the rows (or a list), as passed to the loss with ``rewards``:
            the totals then record every group's size over the whole batch, and a loss call whose group
            is split across calls (or ranks) is an error.
        paired: count for :func:`upg_kernels.preference_loss` (rows ``[:B]`` chosen, ``[B:]`` rejected,
            per mask): ``main_rows`` = pairs, ``main_tokens`` = chosen tokens.

    One small all-reduce over ``group`` (and an all-gather of the labels with ``group_ids``) when it is
    given, one over ``cp_group`` when it is given.
    """
    check_group(cp_group, "batch_totals(cp_group=...)")
    if cp_group is not None and paired:
        raise ValueError("batch_totals(paired=True) does not take cp_group: preference_loss has no context "
                         "parallel form (pass whole sequences)")
    masks = _as_list(loss_mask, "loss_mask")   # [] is allowed: a rank that holds no row this step
    demos = _as_list(is_demo, "is_demo")
    gids = _as_list(group_ids, "group_ids")
    if is_demo is not None and len(demos) != len(masks):
        raise ValueError(f"is_demo has {len(demos)} entries for {len(masks)} loss masks")
    if group_ids is not None and len(gids) != len(masks):
        raise ValueError(f"group_ids has {len(gids)} entries for {len(masks)} loss masks")
    counts = torch.zeros(4, dtype=torch.float64)
    labels = []
    for k, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or m.dim() not in (1, 2):
            raise TypeError("loss_mask must be a [B, T] (or flat [N]) tensor or a list of them, got "
                            f"{type(m).__name__ if not isinstance(m, torch.Tensor) else list(m.shape)}")
        m2 = (m.reshape(-1, 1) if m.dim() == 1 else m) != 0
        B = m2.shape[0]
        d = demos[k] if is_demo is not None else None
        if d is None:
            d = torch.zeros(B, dtype=torch.bool)
        else:
            d = torch.as_tensor(d)
            if tuple(d.shape) != (B,):
                raise ValueError(f"is_demo must have shape [B={B}] like loss_mask's rows, got {list(d.shape)}")
            d = d.to(m2.device) != 0
        tok = m2.sum(-1).to(torch.float64)
        if paired:
            if B % 2:
                raise ValueError(f"paired=True needs 2B rows (chosen then rejected), got {B}")
            counts += torch.stack([tok[:B // 2].sum(), tok.new_zeros(()), tok.new_tensor(B // 2),
                                   tok.new_zeros(())]).cpu()
        else:
            counts += torch.stack([tok[~d].sum(), tok[d].sum(), (~d).sum().to(tok.dtype),
                                   d.sum().to(tok.dtype)]).cpu()
        if group_ids is not None:
            g = torch.as_tensor(gids[k])
            if tuple(g.shape) != (B,) or g.dtype.is_floating_point:
                raise ValueError(f"group_ids must be integer labels of shape [B={B}], got "
                                 f"{g.dtype} {list(g.shape)}")
            labels += g.cpu().tolist()
    dev = masks[0].device if masks and masks[0].device.type != "meta" else torch.device("cpu")
    cp = group_size(cp_group)
    if cp_group is not None:
        # tokens summed over the CP ranks, rows once: every rank of the group holds the same rows. The
        # sums of the row counts and of their squares tell (Cauchy-Schwarz) whether they are equal.
        rows = counts[2:]
        t = _all_reduce(torch.cat([counts, rows * rows]), cp_group, dev)
        if bool((t[2:4] * t[2:4] != cp * t[4:]).any()):
            raise ValueError("batch_totals(cp_group=...): the ranks of cp_group hold different numbers of main / "
                             "demonstration rows; under context parallelism every rank of the group holds the "
                             "same rows (its own token positions of each)")
        counts = torch.cat([t[:2], t[2:4] / cp])
    world = 1
    if group is not None:
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("batch_totals(group=...) needs an initialized torch.distributed process group")
        check_group(group, "batch_totals(group=...)")
        world = dist.get_world_size(group)
        counts = _all_reduce(counts, group, dev)
        if group_ids is not None:
            every = [None] * world
            dist.all_gather_object(every, labels, group=group)
            labels = [x for part in every for x in part]
    ids = cnts = None
    if group_ids is not None:
        u, c = torch.unique(torch.tensor(labels, dtype=torch.long), return_counts=True)
        ids, cnts = tuple(u.tolist()), tuple(c.tolist())
    mt, dt, mr, dr = (int(round(x)) for x in counts.tolist())
    return BatchTotals(mt, dt, mr, dr, world, bool(paired), ids, cnts, cp)


@dataclass
class LossBatch:
    """The per-token and per-row inputs of one loss call (the one list of them).

    Per-token fields are ``[B, T]`` like ``targets`` (flat ``[N]`` for flat input), per-row ones ``[B]``.

    - ``loss_mask``: mask (bool or numbers; nonzero = in the loss). Default: all in.
    - ``advantages``: ``[B]``, ``[B, 1]`` or ``[B, T]``; needed by ``advantage="given"``, optional
      (precomputed) for the group modes, refused by ``advantage="one"``.
    - ``rewards``: ``[B]``; with ``group_size`` (consecutive groups) or ``group_ids`` ``[B]`` the
      advantages are computed in the loss with ``config.advantage``'s group mode. The call must then
      hold whole groups: **compute advantages before splitting** a batch into micro-batches or ranks
      (:func:`upg_kernels.group_advantages`, ``group=`` for ``batch_std``) and pass ``advantages``.
      With ``demo_part="sft"`` the demo rows are left out of the groups (``group_size`` then counts
      main rows); with ``demo_part="shaped"`` they are in their groups (LUFFY).
    - ``old_logprobs``: log-probs of the policy that sampled (``None`` = on-policy: ``old = sg(logp)``).
      ``ref_logprobs``: reference-model log-probs (KL, chi2/hellinger). ``rollout_logprobs``: the
      sampler's (vLLM) log-probs for ``config.rollout_is``.
    - ``is_demo``: ``[B]`` bool, demonstration rows (they take ``config.demo_part``).
    - ``is_ratio``: explicit importance weight ``[B]``, ``[B, 1]`` or ``[B, T]`` multiplying the main
      policy term (Liger's ``vllm_is_ratio``).
    - ``num_items_in_batch``: TRL's convention: the token_mean denominator of the main part (an int or
      0-d tensor > 0; pass the per-process count).
    - ``totals``: the :class:`BatchTotals` of the whole batch (:func:`batch_totals`): every aggregation
      divides by those global counts (micro-batches and ranks then add up to the whole batch).
    """
    loss_mask: Any = None
    advantages: Any = None
    rewards: Any = None
    group_size: Optional[int] = None
    group_ids: Any = None
    old_logprobs: Any = None
    ref_logprobs: Any = None
    rollout_logprobs: Any = None
    is_demo: Any = None
    is_ratio: Any = None
    num_items_in_batch: Any = None
    totals: Optional[BatchTotals] = None

    @classmethod
    def of(cls, batch: Optional["LossBatch"], fields: dict, where: str) -> "LossBatch":
        """``batch`` with the keyword shorthand ``fields`` of the function ``where`` merged in (a field
        may come from one of the two only)."""
        unknown = sorted(set(fields) - set(FIELD_NAMES))
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; the batch fields "
                            f"are {list(FIELD_NAMES)}")
        if batch is None:
            return cls(**fields)
        if not isinstance(batch, LossBatch):
            raise TypeError(f"{where}(batch=...) must be a LossBatch, got {type(batch).__name__}")
        both = sorted(k for k, v in fields.items() if v is not None and getattr(batch, k) is not None)
        if both:
            raise ValueError(f"{where}(): {both} given both in batch= and as keyword arguments")
        return dataclasses.replace(batch, **{k: v for k, v in fields.items() if v is not None})

    def select(self, rows) -> "LossBatch":
        """The rows ``rows`` (a slice or index tensor) of every per-token / per-row field (``group_size``,
        ``num_items_in_batch`` and ``totals`` are kept): one micro-batch of this batch."""
        def pick(x):
            return x[rows] if isinstance(x, torch.Tensor) and x.dim() >= 1 else x
        return dataclasses.replace(self, **{n: pick(getattr(self, n)) for n in ROW_FIELDS})


FIELD_NAMES: tuple = tuple(f.name for f in dataclasses.fields(LossBatch))
# the fields indexed by row (the others hold one value for the whole call)
ROW_FIELDS: tuple = tuple(n for n in FIELD_NAMES if n not in ("group_size", "num_items_in_batch", "totals"))
