"""Validation and preparation of the per-token inputs of the unified loss (one owner for both entries).

:func:`upg_kernels.unified_policy_loss` (from hidden states) and
:func:`upg_kernels.policy_loss_from_logprobs` (from ``[B, T]`` log-probs) take the same per-token and
per-row arguments (the fields of :class:`~upg_kernels.losses.batch.LossBatch`);
:func:`prepare_loss_inputs` checks them, builds the masks and the advantages and returns a
:class:`LossInputs`. Everything here is O(B*T): nothing vocabulary-sized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.meta import any_bad, any_true
from ..parallel.comm import check_group, group_size as ranks_of
from .advantages import group_advantages
from .batch import BatchTotals, LossBatch
from .config import GROUP_ADVANTAGES, LossConfig


@dataclass
class LossInputs:
    """Checked ``[B, T]`` inputs of one loss call (``cd`` = the epilogue's float dtype)."""
    B: int
    T: int
    cd: torch.dtype
    valid: torch.Tensor            # [B, T] bool: in the loss (target not ignored, loss_mask nonzero)
    main_tok: torch.Tensor         # [B, T] bool: valid tokens of the main (non-demonstration) rows
    demo_tok: torch.Tensor         # [B, T] bool: valid tokens of the demonstration rows
    main_rows: torch.Tensor        # [B] bool
    demo_rows: torch.Tensor        # [B] bool
    adv: torch.Tensor              # [B, T] advantages, 0 where unused
    adv_per_row: bool              # advantages were given (or computed) per row
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    rol: Optional[torch.Tensor]
    isr: Optional[torch.Tensor]    # [B, T] explicit IS ratio (1 outside the main tokens)
    isr_rows: Optional[torch.Tensor]   # [B, 1] when is_ratio is per sequence
    num_items: object = None
    totals: Optional[BatchTotals] = None
    cp_group: object = None        # context-parallel group (sequence sums are completed over it)

    @property
    def have_ref(self) -> bool:
        return self.ref is not None

    def to_dtype(self, cd: torch.dtype) -> "LossInputs":
        """The float inputs cast to ``cd`` (the kernel's output dtype, e.g. under autocast)."""
        if cd == self.cd:
            return self
        c = {n: (None if getattr(self, n) is None else getattr(self, n).to(cd))
             for n in ("adv", "old", "ref", "rol", "isr", "isr_rows")}
        return LossInputs(**{**self.__dict__, **c, "cd": cd})


def as_config(config) -> LossConfig:
    if isinstance(config, LossConfig):
        return config
    if isinstance(config, str):
        return LossConfig.preset(config)
    raise TypeError(f"config must be a LossConfig or a preset name, got {type(config).__name__}")


def _same_device(name, x, device):
    """A tensor argument on another device than hidden is an error (no silent copy between devices)."""
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden (the loss's input) is on {device}; move it "
                         f"there (e.g. {name}.to(hidden.device))")


def _per_token(name, x, B, T, flat, device, dtype=None):
    """Check an optional per-token tensor and return it as [B, T]."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    _same_device(name, x, device)
    want = (B,) if flat else (B, T)
    if tuple(x.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)} (like targets), got {list(x.shape)}")
    if dtype is not None and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor of log-probs, got {x.dtype}")
    x = x.reshape(B, T).to(device)
    return x if dtype is None else x.to(dtype)


def _per_row(name, x, B, device):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, device=device)
    _same_device(name, x, device)
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name} must have shape [B={B}] (one value per sequence), got {list(x.shape)}")
    return x.to(device)


def check_totals(totals: BatchTotals, main_tok, demo_tok, main_rows, demo_rows):
    """This call's counts must fit in the whole batch's ``totals`` (else they are another batch's)."""
    if main_tok.device.type == "meta":
        return
    local = torch.stack([main_tok.sum(), demo_tok.sum(), main_rows.sum(), demo_rows.sum()]).tolist()
    names = ("main_tokens", "demo_tokens", "main_rows", "demo_rows")
    over = [f"{n}: {int(v)} here > {getattr(totals, n)}" for n, v in zip(names, local) if v > getattr(totals, n)]
    if over:
        raise ValueError(f"totals do not cover this call ({'; '.join(over)}): they were counted over another "
                         "batch, or over a loss_mask / is_demo other than this call's (batch_totals counts "
                         "every micro-batch of the step, on every rank of its group)")


_WHOLE_GROUPS = ("compute advantages before splitting: group_advantages over whole groups (group= for "
                 "batch_std), then pass advantages=")


def check_whole_groups(cfg, gid, in_groups, totals):
    """Rewards turn into advantages inside the loss only when this call holds whole groups.

    With ``totals`` counted with ``group_ids``, each label's rows here must be all of that label's rows in
    the whole batch (a group split across micro-batches or ranks is an error). Without them, the groups
    of one call must have one size (a smaller one is a partial or split group). ``batch_std`` needs the
    whole batch's std: with totals, a call holding only part of the batch is an error."""
    if gid is None or gid.device.type == "meta":
        pass
    elif totals is not None and totals.group_ids is not None:
        ids, cnt = torch.unique(gid, return_counts=True)
        whole = totals.group_count()
        bad = [(int(i), int(c), whole.get(int(i), 0)) for i, c in zip(ids.tolist(), cnt.tolist())
               if whole.get(int(i), 0) != c]
        if bad:
            i, c, n = bad[0]
            raise ValueError(f"group {i} has {c} row(s) in this call but {n} in the whole batch (totals): a "
                             f"group split across calls; every call must hold whole groups, or {_WHOLE_GROUPS}")
    else:
        ids, cnt = torch.unique(gid[in_groups], return_counts=True)
        if cnt.numel() > 1 and int(cnt.min()) != int(cnt.max()):
            small = int(ids[cnt.argmin()])
            raise ValueError(f"group sizes differ in this call (group {small}: {int(cnt.min())} row(s), another: "
                             f"{int(cnt.max())}): a partial group, or one split across calls, would silently get "
                             f"other advantages; pass whole groups, or {_WHOLE_GROUPS}, or (groups of different "
                             "sizes on purpose) totals=batch_totals(..., group_ids=...) of the whole batch")
    if cfg.advantage == "batch_std" and totals is not None and \
            int(in_groups.sum()) < (totals.main_rows + (totals.demo_rows if cfg.demo_part != "sft" else 0)):
        raise ValueError("advantage='batch_std' from rewards normalises by the std of the whole batch, but this "
                         f"call holds only part of it (totals); {_WHOLE_GROUPS}")


def _check_num_items(n, capturable=False):
    """``num_items_in_batch``: None, a number > 0 or a one-element tensor > 0 (TRL's convention; a
    tensor's value is not read with ``capturable``)."""
    if n is None:
        return
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"num_items_in_batch must be a number or a one-element tensor, got a tensor of "
                            f"shape {list(n.shape)} and dtype {n.dtype}")
        bad = any_bad(~(n > 0)) if n.device.type != "meta" and not capturable else False
    elif isinstance(n, (int, float)) and not isinstance(n, bool):
        bad = not n > 0
    else:
        raise TypeError(f"num_items_in_batch must be a number or a one-element tensor, got {type(n).__name__}")
    if bad:
        raise ValueError(f"num_items_in_batch must be > 0 (the token count the main part's token_mean "
                         f"divides by), got {n if not isinstance(n, torch.Tensor) else n.item()!r}")


def _advantages_bt(advantages, B, T, flat, device, dtype):
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor or None, got {type(advantages).__name__}")
    _same_device("advantages", advantages, device)
    s = tuple(advantages.shape)
    if flat:
        if s != (B,):
            raise ValueError(f"advantages must have shape [N={B}] for flat input, got {list(s)}")
        return advantages.reshape(B, 1).to(device, dtype), True
    if s == (B,) or s == (B, 1):
        return advantages.reshape(B, 1).to(device, dtype).expand(B, T), True
    if s == (B, T):
        return advantages.to(device, dtype), False
    raise ValueError(f"advantages must have shape [B={B}], [B, 1] or [B={B}, T={T}], got {list(s)}")




def prepare_loss_inputs(cfg: LossConfig, B: int, T: int, flat: bool, valid: torch.Tensor,
                        cd: torch.dtype, batch: LossBatch, *, cp_group=None,
                        capturable=False) -> LossInputs:
    """Check the per-token / per-row arguments of ``batch`` and build masks and advantages.

    ``valid`` is the ``[B, T]`` bool mask of the positions the caller can score (targets not
    ``ignore_index``); ``loss_mask`` narrows it. ``flat``: the caller's per-token tensors are ``[N]``
    (``B = N`` sequences of length ``T = 1``). ``cp_group``: the context-parallel process group whose
    ranks hold the other tokens of the same rows (None: the rows are whole here).
    ``capturable``: no check reads device values (no host
    synchronization): ``is_demo`` must be bool, the inputs a part needs are required whenever the part
    can exist (main rows: always; demonstration rows: when ``is_demo`` is given), and rewards take
    ``group_size`` (not ``group_ids``, whose labels are data) and the advantages of groups are computed
    without the non-finite check (a non-finite reward gives NaN advantages to its group)."""
    check_group(cp_group, "cp_group")
    b = batch
    loss_mask, advantages, rewards, group_size, group_ids = (
        b.loss_mask, b.advantages, b.rewards, b.group_size, b.group_ids)
    old_logprobs, ref_logprobs, rollout_logprobs = b.old_logprobs, b.ref_logprobs, b.rollout_logprobs
    is_demo, is_ratio, num_items_in_batch, totals = b.is_demo, b.is_ratio, b.num_items_in_batch, b.totals
    if totals is not None and capturable:
        raise ValueError("totals with capturable=True is not supported: checking the totals against this "
                         "batch reads device values (a host synchronization)")
    dev = valid.device
    _check_num_items(num_items_in_batch, capturable)
    if totals is not None:
        if num_items_in_batch is not None:
            raise ValueError("pass totals (global counts of every part) or num_items_in_batch (TRL's main "
                             "token_mean denominator), not both")
        if not isinstance(totals, BatchTotals):
            raise TypeError(f"totals must be a BatchTotals (upg_kernels.batch_totals), got {type(totals).__name__}")
        if totals.paired:
            raise ValueError("totals were counted with paired=True (for preference_loss); count the policy "
                             "loss's batch with batch_totals(loss_mask, is_demo=...)")
        cp = ranks_of(cp_group)
        if totals.cp_size != cp:
            raise ValueError(
                f"totals were counted over a context-parallel group of {totals.cp_size} rank(s) but this call's "
                f"cp_group has {cp}: " + ("pass the cp_group that batch_totals(..., cp_group=...) counted with"
                                          if cp == 1 else "count them with batch_totals(..., cp_group=cp_group)"
                                          " (tokens summed over it, each row once)"))
    lm = _per_token("loss_mask", loss_mask, B, T, flat, dev)
    if lm is not None:
        if totals is not None and any_bad((lm != 0) & ~valid):
            raise ValueError("with totals, loss_mask must be the mask batch_totals counted, which excludes the "
                             "positions whose target is ignore_index; this loss_mask includes some (pass "
                             "loss_mask & (targets != ignore_index) to both)")
        valid = valid & (lm != 0)
    demo_rows = _per_row("is_demo", is_demo, B, dev)
    if demo_rows is None:
        demo_rows = torch.zeros(B, dtype=torch.bool, device=dev)
    elif capturable:
        if demo_rows.dtype != torch.bool:
            raise TypeError(f"capturable=True needs is_demo as a bool tensor, got {demo_rows.dtype}")
        if cfg.demo_part is None:
            raise ValueError("is_demo is given but config.demo_part is None; use a preset with "
                             "demonstrations (hpt, hpt_release, luffy) or set demo_part")
    else:
        if demo_rows.dtype != torch.bool:
            if demo_rows.dtype.is_floating_point or any_bad((demo_rows != 0) & (demo_rows != 1)):
                raise ValueError("is_demo must be a bool tensor (or 0/1 integers) of shape [B]")
            demo_rows = demo_rows.bool()
        if cfg.demo_part is None and any_bad(demo_rows):
            raise ValueError("is_demo marks demonstration rows but config.demo_part is None; use a "
                             "preset with demonstrations (hpt, hpt_release, luffy) or set demo_part")
    main_rows = ~demo_rows
    main_tok = valid & main_rows[:, None]
    demo_tok = valid & demo_rows[:, None]
    if totals is not None:
        check_totals(totals, main_tok, demo_tok, main_rows, demo_rows)
    if capturable:                          # no values read: every part that can exist, exists
        has_main, has_demo = True, is_demo is not None
    else:
        has_main = any_true(main_rows)      # meta (memory model): True, the worst case
        has_demo = any_true(demo_rows)

    # ---------------------------------------------------------------- per-token inputs (checked)
    old = _per_token("old_logprobs", old_logprobs, B, T, flat, dev, cd)
    ref = _per_token("ref_logprobs", ref_logprobs, B, T, flat, dev, cd)
    rol = _per_token("rollout_logprobs", rollout_logprobs, B, T, flat, dev, cd)
    need_ref = cfg.likelihood in ("chi2", "hellinger")
    if need_ref and ref is None and has_main:
        raise ValueError(f"likelihood={cfg.likelihood!r} needs ref_logprobs (the implicit reward is "
                         "fdiv_beta * (logp - ref))")
    if cfg.kl_coef > 0 and ref is None and has_main:
        raise ValueError(f"config.kl_coef={cfg.kl_coef} needs ref_logprobs (the KL is to a reference "
                         "model's log-probs); set kl_coef=0 to train without a KL term")
    if cfg.rollout_is is not None and rol is None and has_main:
        raise ValueError(f"config.rollout_is={cfg.rollout_is!r} needs rollout_logprobs")

    isr = None
    isr_rows = None   # [B, 1] when is_ratio is per sequence (VESPO folds it once per sequence)
    if is_ratio is not None:
        if not isinstance(is_ratio, torch.Tensor):
            raise TypeError("is_ratio must be a torch.Tensor or None")
        _same_device("is_ratio", is_ratio, dev)
        s = tuple(is_ratio.shape)
        if s in ((B,), (B, 1)):
            isr_rows = is_ratio.reshape(B, 1).to(dev, cd)
            isr_rows = torch.where(main_rows[:, None], isr_rows, torch.ones_like(isr_rows))
            isr = isr_rows.expand(B, T)
        elif not flat and s == (B, T):
            isr = is_ratio.to(dev, cd)
        else:
            raise ValueError(f"is_ratio must have shape [B={B}], [B, 1] or [B, T], got {list(s)}")
        isr = torch.where(main_tok, isr, torch.ones_like(isr))

    # ---------------------------------------------------------------- advantages
    needs_adv_main = has_main and cfg.advantage != "one"
    needs_adv_demo = has_demo and cfg.demo_part == "shaped"
    adv = None
    adv_per_row = True
    if cfg.advantage == "one":
        if advantages is not None or rewards is not None:
            raise ValueError("config.advantage='one' (SFT-like) takes no advantages or rewards")
    elif advantages is not None and rewards is not None:
        raise ValueError("pass advantages or rewards (with group_size/group_ids), not both")
    elif advantages is not None:
        adv, adv_per_row = _advantages_bt(advantages, B, T, flat, dev, cd)
    elif rewards is not None:
        if cfg.advantage not in GROUP_ADVANTAGES:
            raise ValueError(f"config.advantage={cfg.advantage!r} takes advantages, not rewards; "
                             f"rewards need a group mode {list(GROUP_ADVANTAGES)}")
        rw = _per_row("rewards", rewards, B, dev)
        if group_size is None and group_ids is None:
            raise ValueError("rewards needs group_size or group_ids (the rollouts of one prompt form "
                             "a group)")
        gid = _per_row("group_ids", group_ids, B, dev)
        in_groups = main_rows if cfg.demo_part == "sft" else torch.ones_like(main_rows)
        check_whole_groups(cfg, gid, in_groups, totals)
        a_rows = torch.zeros(B, dtype=cd, device=dev)
        if capturable:
            if gid is not None or (cfg.demo_part == "sft" and is_demo is not None):
                raise ValueError("capturable=True computes group advantages from rewards with "
                                 "group_size only (group_ids, or SFT demonstration rows left out of "
                                 "the groups, need data-dependent indexing); pass advantages instead")
            a_rows = group_advantages(rw, group_size=group_size, mode=cfg.advantage,
                                      eps=cfg.adv_eps, capturable=True).to(cd)
        elif any_true(in_groups):
            a_sel = group_advantages(rw[in_groups], group_size=group_size,
                                     group_ids=None if gid is None else gid[in_groups],
                                     mode=cfg.advantage, eps=cfg.adv_eps)
            a_rows = a_rows.masked_scatter(in_groups, a_sel.to(cd))
        adv = a_rows.reshape(B, 1).expand(B, T)
    elif needs_adv_main or needs_adv_demo:
        raise ValueError(f"config.advantage={cfg.advantage!r} needs advantages, or rewards with "
                         "group_size/group_ids")
    if adv is None:
        adv = torch.ones(B, T, dtype=cd, device=dev)
    uses_adv = main_tok | demo_tok if cfg.demo_part == "shaped" else main_tok
    adv = torch.where(uses_adv, adv, torch.zeros_like(adv))
    return LossInputs(B=B, T=T, cd=cd, valid=valid, main_tok=main_tok, demo_tok=demo_tok,
                      main_rows=main_rows, demo_rows=demo_rows, adv=adv, adv_per_row=adv_per_row,
                      old=old, ref=ref, rol=rol, isr=isr, isr_rows=isr_rows,
                      num_items=num_items_in_batch, totals=totals, cp_group=cp_group)
