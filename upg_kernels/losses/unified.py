"""``unified_policy_loss``: every post-training loss as one fused log-prob pass plus an elementwise epilogue.

The vocabulary-sized work is identical for every method::

    logp, H = token_logprobs(hidden, weight, targets, return_entropy=True)

Everything method-specific is a cheap epilogue over ``[B, T]`` per-token scalars (``logp``, ``H``,
``old``, ``ref``, ``rollout``, mask, advantage, demo flag) plus small per-sequence segmented
reductions (GSPO ratio, sequence IS correction, per-sequence normalization). The epilogue runs on
detached leaf copies of ``logp`` and ``H``; autograd over those ``[B, T]`` scalars gives the exact
per-token coefficients ``g_logp = dL/dlogp = -c_t`` and ``g_ent = dL/dH = -e_t``, which are then
handed to the kernel's backward through the surrogate ``L + sum(g_logp * (logp - sg(logp))) +
sum(g_ent * (H - sg(H)))`` (same value, same gradient). Every zero coefficient is exactly 0
(masked, clipped, equal-reward-group tokens): masks go through ``torch.where`` and masked positions
are sanitized before they enter any formula, so the kernel skips those rows exactly and a NaN in a
masked position cannot reach the loss.

Normalization of mixed batches (``is_demo``): the main rows (``is_demo`` False) and the
demonstration rows are aggregated separately, each over its own rows and tokens only::

    loss = rl_coef * L_main(main rows) + demo_coef * L_demo(demo rows)

so a mixed batch gives exactly the loss and gradients of its two parts computed separately and
added (given the same per-row advantages).

Flat input: ``hidden [N, H]`` with ``targets [N]`` is treated as ``N`` sequences of length 1
(``[N, 1, H]``); every per-token argument is then ``[N]`` and the per-row ones (``advantages``,
``rewards``, ``group_ids``, ``is_demo``) are ``[N]`` too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._backend import resolve_backend
from ..logprobs import token_logprobs
from .advantages import group_advantages
from .aggregation import aggregation_weights
from .config import GROUP_ADVANTAGES, LossConfig
from .fused import (fused_enabled, fused_policy_epilogue, fused_supported,
                    token_weights_and_codes)


@dataclass
class LossOutput:
    """What :func:`unified_policy_loss` returns.

    ``loss``: scalar, differentiable w.r.t. hidden / weight / bias.
    ``logprobs``, ``entropy``: detached per-token values shaped like ``targets`` (float32).
    ``metrics``: dict of python floats (see docs/losses.md, "Metrics").
    ``coef_logp``, ``coef_entropy``: the detached gradient coefficients ``c_t = -dL/dlogp_t`` and
    ``e_t = -dL/dH_t`` shaped like ``targets`` (0 exactly where the kernel skips the row).
    """
    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict = field(default_factory=dict)
    coef_logp: Optional[torch.Tensor] = None
    coef_entropy: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------
def _as_config(config):
    if isinstance(config, LossConfig):
        return config
    if isinstance(config, str):
        return LossConfig.preset(config)
    raise TypeError(f"config must be a LossConfig or a preset name, got {type(config).__name__}")


def _per_token(name, x, B, T, flat, device, dtype=None):
    """Check an optional per-token tensor and return it as [B, T]."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
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
        x = torch.as_tensor(x)
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name} must have shape [B={B}] (one value per sequence), got {list(x.shape)}")
    return x.to(device)


def _advantages_bt(advantages, B, T, flat, device, dtype):
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor or None, got {type(advantages).__name__}")
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


def _aggregate(loss_bt, tok, rows, mode, n_items, max_len, part):
    """Aggregate per-token losses (already 0 outside ``tok``) over the rows ``rows`` [B] bool."""
    w = aggregation_weights(tok, rows, mode, n_items, max_len, part, dtype=loss_bt.dtype)
    return (w * loss_bt).sum()


def _kl(d, kind):
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


# ---------------------------------------------------------------------------------------------
def unified_policy_loss(hidden, weight, targets, *, config, loss_mask=None, advantages=None,
                        rewards=None, group_size=None, group_ids=None, old_logprobs=None,
                        ref_logprobs=None, rollout_logprobs=None, is_demo=None, bias=None,
                        temperature=1.0, num_items_in_batch=None, backend="auto",
                        is_ratio=None, ignore_index=-100, softcap=None,
                        filter_eps=0.0, fused_epilogue=None) -> LossOutput:
    """The loss of ``config`` (a :class:`LossConfig` or a preset name) from hidden states and the lm_head.

    Args:
        hidden: ``[B, T, H]`` (or flat ``[N, H]`` = N sequences of length 1) last hidden states.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` (``[N]``) token ids; ``ignore_index`` positions are masked.
        config: the loss (see :class:`LossConfig`).
        loss_mask: ``[B, T]`` mask (bool or numbers; nonzero = in the loss). Default: all in.
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``; needed by ``advantage="given"``, optional
            (precomputed) for the group modes, refused by ``advantage="one"``.
        rewards: ``[B]``; with ``group_size`` (consecutive groups) or ``group_ids`` ``[B]`` the
            advantages are computed here with ``config.advantage``'s group mode. With
            ``demo_part="sft"`` the demo rows are left out of the groups (``group_size`` then counts
            main rows); with ``demo_part="shaped"`` they are in their groups (LUFFY).
        old_logprobs: ``[B, T]`` log-probs of the policy that sampled (``None`` = on-policy:
            ``old = sg(logp)``). ``ref_logprobs``: reference-model log-probs (KL, chi2/hellinger).
            ``rollout_logprobs``: the sampler's (vLLM) log-probs for ``config.rollout_is``.
        is_demo: ``[B]`` bool, demonstration rows (take ``config.demo_part``).
        temperature: divides the logits. ``num_items_in_batch``: token_mean denominator of the
            main part (DAPO; pass the per-process count). ``backend``: ``"auto"|"torch"|"triton"``.
        is_ratio: optional explicit importance weight ``[B]``, ``[B, 1]`` or ``[B, T]`` multiplying
            the main policy term (Liger's ``vllm_is_ratio``).
        ignore_index, softcap, filter_eps: passed to :func:`upg_kernels.token_logprobs` (target id
            that masks a position; Gemma-2 final-logit softcap; backward tile filter, 0 = exact).
        fused_epilogue: with the Triton backend and a token-local config, run the loss epilogue
            inside a Triton kernel (docs/losses.md "Fused epilogue"). ``None`` (default): on unless
            ``UPG_KERNELS_FUSED_EPILOGUE=0``; ``False`` forces the PyTorch epilogue.

    Returns:
        :class:`LossOutput`.
    """
    cfg = _as_config(config)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if hidden.dim() == 3:
        flat = False
        B, T = hidden.shape[0], hidden.shape[1]
    elif hidden.dim() == 2:
        flat = True
        B, T = hidden.shape[0], 1
    else:
        raise ValueError(f"hidden must have shape [B, T, H] or [N, H], got {list(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {list(hidden.shape[:-1])} (hidden's leading "
                         f"dimensions), got {list(targets.shape)}")
    dev = hidden.device

    # the epilogue's dtype: what token_logprobs returns (float64 for float64 inputs, else float32)
    w_dt = weight.dtype if isinstance(weight, torch.Tensor) else hidden.dtype
    cd = torch.float64 if torch.promote_types(hidden.dtype, w_dt) == torch.float64 else torch.float32

    # ---------------------------------------------------------------- masks
    valid = (targets.reshape(B, T) != ignore_index)
    lm = _per_token("loss_mask", loss_mask, B, T, flat, dev)
    if lm is not None:
        valid = valid & (lm != 0)
    demo_rows = _per_row("is_demo", is_demo, B, dev)
    if demo_rows is None:
        demo_rows = torch.zeros(B, dtype=torch.bool, device=dev)
    else:
        if demo_rows.dtype != torch.bool:
            if demo_rows.dtype.is_floating_point or not bool(((demo_rows == 0) | (demo_rows == 1)).all()):
                raise ValueError("is_demo must be a bool tensor (or 0/1 integers) of shape [B]")
            demo_rows = demo_rows.bool()
        if cfg.demo_part is None and bool(demo_rows.any()):
            raise ValueError("is_demo marks demonstration rows but config.demo_part is None; use a "
                             "preset with demonstrations (hpt, hpt_release, luffy) or set demo_part")
    main_rows = ~demo_rows
    main_tok = valid & main_rows[:, None]
    demo_tok = valid & demo_rows[:, None]
    has_main = bool(main_rows.any())
    has_demo = bool(demo_rows.any())

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
    have_ref = ref is not None
    if cfg.rollout_is is not None and rol is None and has_main:
        raise ValueError(f"config.rollout_is={cfg.rollout_is!r} needs rollout_logprobs")

    isr = None
    isr_rows = None   # [B, 1] when is_ratio is per sequence (VESPO folds it once per sequence)
    if is_ratio is not None:
        if not isinstance(is_ratio, torch.Tensor):
            raise TypeError("is_ratio must be a torch.Tensor or None")
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
        a_rows = torch.zeros(B, dtype=cd, device=dev)
        if bool(in_groups.any()):
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

    use_fused = (cd == torch.float32 and fused_enabled(fused_epilogue) and fused_supported(cfg)
                 and _backend_name(backend, dev) == "triton")
    if use_fused:
        # ------------------------------------------------------------ Triton forward + fused epilogue
        logp_bt, ent_bt, total, parts, aux, g_lp, g_H = _fused_pass(
            cfg, hidden, weight, targets, B, T, bias=bias, temperature=temperature,
            ignore_index=ignore_index, softcap=softcap, filter_eps=filter_eps, old=old, ref=ref,
            rol=rol, adv=adv, isr=isr, main_tok=main_tok, demo_tok=demo_tok, main_rows=main_rows,
            demo_rows=demo_rows, num_items=num_items_in_batch)
        ent_d = torch.where(valid, ent_bt.detach(), torch.zeros_like(ent_bt))
    else:
        logp_bt, ent_bt, total, parts, aux, g_lp, g_H, ent_d, adv = _pytorch_pass(
            cfg, hidden, weight, targets, B, T, bias=bias, temperature=temperature,
            ignore_index=ignore_index, softcap=softcap, filter_eps=filter_eps, backend=backend,
            cd=cd, old=old, ref=ref, rol=rol, adv=adv, isr=isr, isr_rows=isr_rows, valid=valid,
            main_tok=main_tok, demo_tok=demo_tok, main_rows=main_rows, demo_rows=demo_rows,
            num_items=num_items_in_batch)

    # ---------------------------------------------------------------- surrogate for the kernel backward
    need_grad = torch.is_grad_enabled() and logp_bt.requires_grad
    if need_grad:
        zero = torch.zeros_like(g_lp)
        loss = total + (g_lp * torch.where(valid, logp_bt - logp_bt.detach(), zero)).sum()
        if bool((g_H != 0).any()):
            loss = loss + (g_H * torch.where(valid, ent_bt - ent_bt.detach(), zero)).sum()
    else:
        loss = total

    # ---------------------------------------------------------------- metrics (one sync)
    metrics = _metrics(cfg, aux, parts, valid, main_tok, demo_tok, main_rows, demo_rows, adv,
                       adv_per_row, ent_d, g_lp, g_H, have_ref)
    shape = tuple(targets.shape)
    return LossOutput(loss=loss, logprobs=logp_bt.detach().reshape(shape),
                      entropy=ent_bt.detach().reshape(shape),
                      metrics=metrics, coef_logp=(-g_lp).reshape(shape),
                      coef_entropy=(-g_H).reshape(shape))


def _backend_name(backend, dev):
    try:
        return resolve_backend(backend, dev)
    except ValueError:   # token_logprobs raises it after its input checks
        return None


def _pytorch_pass(cfg, hidden, weight, targets, B, T, *, bias, temperature, ignore_index, softcap,
                  filter_eps, backend, cd, old, ref, rol, adv, isr, isr_rows, valid, main_tok, demo_tok,
                  main_rows, demo_rows, num_items):
    """token_logprobs, then the PyTorch epilogue on [B, T] leaf copies; autograd gives g_lp, g_H."""
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               ignore_index=ignore_index, return_entropy=True, backend=backend,
                               softcap=softcap, filter_eps=filter_eps)
    logp_bt = logp.reshape(B, T)
    ent_bt = ent.reshape(B, T)
    if logp.dtype != cd:   # autocast or an unexpected backend dtype: follow the kernel
        cd = logp.dtype
        adv = adv.to(cd)
        old, ref, rol, isr, isr_rows = (None if x is None else x.to(cd)
                                        for x in (old, ref, rol, isr, isr_rows))

    # ---------------------------------------------------------------- sanitize (finite values only)
    # outside the valid tokens logp/H are replaced by 0 (a garbage hidden state at a masked
    # position cannot reach the loss or the coefficients)
    lp_d = torch.where(valid, logp_bt.detach(), torch.zeros_like(logp_bt))
    ent_d = torch.where(valid, ent_bt.detach(), torch.zeros_like(ent_bt))
    # old/ref/rollout/is_ratio feed only the main part: outside its valid tokens (masked tokens and
    # demonstration rows, which often carry no sampler log-probs) they are replaced by finite values
    old = lp_d if old is None else torch.where(main_tok, old, lp_d)
    ref = lp_d if ref is None else torch.where(main_tok, ref, lp_d)
    rol = None if rol is None else torch.where(main_tok, rol, old)

    # ---------------------------------------------------------------- epilogue on leaf copies
    with torch.enable_grad():
        lp = lp_d.clone().requires_grad_(True)
        H = ent_d.clone().requires_grad_(True)
        total, parts, aux = _epilogue(cfg, lp, H, old, ref, rol, (isr, isr_rows), adv, valid, main_tok,
                                      demo_tok, main_rows, demo_rows, num_items)
        g_lp, g_H = torch.autograd.grad(total, [lp, H], allow_unused=True)
    g_lp = torch.zeros_like(lp_d) if g_lp is None else g_lp.detach()
    g_H = torch.zeros_like(lp_d) if g_H is None else g_H.detach()
    # exact zeros: a coefficient outside the valid tokens is 0 by construction (torch.where)
    return logp_bt, ent_bt, total.detach(), parts, aux, g_lp, g_H, ent_d, adv


def _fused_pass(cfg, hidden, weight, targets, B, T, *, bias, temperature, ignore_index, softcap,
                filter_eps, old, ref, rol, adv, isr, main_tok, demo_tok, main_rows, demo_rows, num_items):
    """Triton forward + the fused epilogue kernel (token-local configs; losses/fused.py)."""
    w_tok, code = token_weights_and_codes(cfg, main_tok, demo_tok, main_rows, demo_rows, num_items)
    outs = fused_policy_epilogue(cfg, hidden, weight, targets, bias=bias, temperature=temperature,
                                 ignore_index=ignore_index, softcap=softcap, filter_eps=filter_eps,
                                 old=old, ref=ref, rol=rol, adv=adv, isr=isr, w=w_tok, code=code)
    # only logp and ent carry the kernel backward; the other outputs are values (detached)
    logp, ent = (x.reshape(B, T) for x in outs[:2])
    _lse, ell, g_lp, g_H, ratio, kl, rollw, flags = (x.detach().reshape(B, T) for x in outs[2:])
    zero = torch.zeros_like(ell)
    L_main = torch.where(main_tok, ell, zero).sum()
    L_demo = torch.where(demo_tok, ell, zero).sum()
    total = cfg.rl_coef * L_main + cfg.demo_coef * L_demo
    aux = {"kl": kl}
    if cfg.reference == "old":
        aux["ratio"] = ratio
        aux["clip_low"] = (flags & 1) != 0
        aux["clip_high"] = (flags & 2) != 0
        aux["dual"] = (flags & 4) != 0
    if cfg.rollout_is is not None and rol is not None:
        aux["rollout_w"] = rollw
    return logp, ent, total, (L_main, L_demo), aux, g_lp, g_H


# ---------------------------------------------------------------------------------------------
_VESPO_LOG_FLOOR = math.log(1e-8)


def vespo_gamma_weight(log_w, adv, *, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's gamma weight ``phi(w) = exp(lam + k log w - lam w)`` (so ``phi(1) = 1``), detached.

    ``log_w`` is the log sequence ratio (any shape broadcasting with ``adv``); it is clamped to
    ``[log 1e-8, 20]`` first. ``k, lam`` are the ``*_pos`` values where ``adv >= 0`` and the ``*_neg`` values
    elsewhere; ``lam`` is floored at 1e-4 and a non-finite ``phi`` (overflow) becomes 0 -- the conventions
    of TRL 1.16 / Liger 0.8.5 ``get_gamma_weights``.
    """
    with torch.no_grad():
        log_w = torch.clamp(log_w.detach(), _VESPO_LOG_FLOOR, 20.0)
        w = torch.exp(log_w)
        nonneg = adv.detach() >= 0
        one = torch.ones_like(adv, dtype=log_w.dtype)
        k = torch.where(nonneg, k_pos * one, k_neg * one)
        lam = torch.clamp(torch.where(nonneg, lambda_pos * one, lambda_neg * one), min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * w)
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _rollout_weight(cfg, old, rol, main_tok):
    """The detached sampler-vs-trainer IS weight of ``cfg.rollout_is`` (token or per-sequence, broadcast)."""
    log_w = torch.where(main_tok, old - rol, torch.zeros_like(old))
    if cfg.rollout_is.startswith("sequence"):
        log_w = log_w.sum(-1, keepdim=True).expand_as(old)
    log_cap = math.log(cfg.rollout_is_cap)
    w_trunc = torch.exp(torch.clamp(log_w, max=log_cap))
    if cfg.rollout_is.endswith("truncate"):
        w = w_trunc
    else:
        w = torch.where(log_w <= log_cap, w_trunc, torch.zeros_like(w_trunc))
    return w.detach()


def _main_token_loss(cfg, lp, H, old, ref, rol, isr_pair, adv, valid, main_tok):
    """Per-token loss of the main part (before masking) and auxiliaries for the metrics."""
    isr, isr_rows = isr_pair
    aux = {}
    A = adv
    p = torch.exp(lp)
    one = torch.ones_like(lp)
    w_roll = None
    if cfg.rollout_is is not None and rol is not None:
        w_roll = _rollout_weight(cfg, old, rol, main_tok)
        aux["rollout_w"] = w_roll
    r = None
    if cfg.reference == "old":
        log_ratio = torch.where(main_tok, lp - old, torch.zeros_like(lp))
        if cfg.ratio_level == "sequence":
            n = main_tok.sum(-1, keepdim=True).to(lp.dtype).clamp(min=1.0)
            log_ratio = (log_ratio.sum(-1, keepdim=True) / n).expand_as(lp)
        r = torch.exp(log_ratio)
        aux["ratio"] = r.detach()
        zero_b = torch.zeros_like(lp, dtype=torch.bool)
        low, high, dual = zero_b, zero_b, zero_b
        st = cfg.stabilization
        if st == "none":
            loss = -r * A
        elif st in ("clip", "seq_clip"):
            r1 = r if cfg.delta is None else torch.clamp(r, max=cfg.delta)
            rc = torch.clamp(r, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
            loss = -torch.minimum(r1 * A, rc * A)
            rd = r.detach()
            low = (rd < 1.0 - cfg.eps_low) & (A < 0)
            high = (rd > 1.0 + cfg.eps_high) & (A > 0)
            if cfg.dual_clip is not None:
                cap = -cfg.dual_clip * A
                dual = (A < 0) & (loss.detach() > cap)
                loss = torch.where(A < 0, torch.minimum(loss, cap), loss)
        elif st == "cispo":
            w = torch.clamp(r, max=cfg.eps_high).detach()
            loss = -w * A * lp
            high = (r.detach() > cfg.eps_high) & (A > 0)
        elif st == "vespo":
            # sequence log-ratio sum_t m clamp(logp - old, -20, 20); the sampler corrections (is_ratio,
            # token rollout_is weights) are folded into it in log space instead of multiplying the loss
            zero = torch.zeros_like(lp)
            with torch.no_grad():
                s = torch.where(main_tok, torch.clamp(lp - old, -20.0, 20.0), zero).sum(-1, keepdim=True)
                if isr_rows is not None:
                    s = s + torch.clamp(torch.log(isr_rows), _VESPO_LOG_FLOOR, 20.0)
                elif isr is not None:
                    s = s + torch.where(main_tok, torch.clamp(torch.log(isr), _VESPO_LOG_FLOOR, 20.0),
                                        zero).sum(-1, keepdim=True)
                if w_roll is not None:
                    s = s + torch.where(main_tok, torch.clamp(torch.log(w_roll), _VESPO_LOG_FLOOR, 20.0),
                                        zero).sum(-1, keepdim=True)
            phi = vespo_gamma_weight(s, A, k_pos=cfg.vespo_k_pos, lambda_pos=cfg.vespo_lambda_pos,
                                     k_neg=cfg.vespo_k_neg, lambda_neg=cfg.vespo_lambda_neg)
            phi = phi.expand_as(lp)
            aux["vespo_phi"] = phi
            loss = -phi * A * lp
        else:  # sapo
            tau = torch.where(A > 0, cfg.tau_pos * one, cfg.tau_neg * one)
            loss = -(4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * A
        aux["clip_low"], aux["clip_high"], aux["dual"] = low, high, dual
    elif cfg.reference == "current":
        if cfg.likelihood == "logp":
            g = lp
        elif cfg.likelihood == "dft":
            g = p.detach() * lp
        elif cfg.likelihood == "chi2":
            u = cfg.fdiv_beta * (lp - ref)
            g = lp - p * u * u / (4.0 * cfg.fdiv_beta)
        else:  # hellinger
            u = torch.clamp(cfg.fdiv_beta * (lp - ref), max=0.5)
            g = lp - p * u * u / ((1.0 - u) * cfg.fdiv_beta)
        loss = -A * g
    elif cfg.reference == "one":
        loss = -A * p
    else:  # shaped
        loss = -A * p / (p + cfg.shaping_gamma)

    # rollout importance correction (sampler vs trainer), detached, on the policy term only
    # (VESPO folded both corrections into its sequence weight above)
    if cfg.stabilization != "vespo":
        if w_roll is not None:
            loss = loss * w_roll
        if isr is not None:
            loss = loss * isr
    # KL to the reference, optionally times the (unclamped, differentiable) ratio: the bias-corrected
    # estimator of TRL/Liger use_bias_correction_kl
    if cfg.kl_coef > 0:
        kl = _kl(lp - ref, cfg.kl_type)
        if cfg.kl_bias_correction:
            kl = kl * r
        loss = loss + cfg.kl_coef * kl
    kl_m = _kl(lp - ref, cfg.kl_type).detach()
    if cfg.kl_bias_correction:
        kl_m = kl_m * r.detach()
    aux["kl"] = kl_m
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * H
    return loss, aux


def _epilogue(cfg, lp, H, old, ref, rol, isr_pair, adv, valid, main_tok, demo_tok, main_rows, demo_rows,
              num_items):
    zero = torch.zeros_like(lp)
    ell, aux = _main_token_loss(cfg, lp, H, old, ref, rol, isr_pair, adv, valid, main_tok)
    ell = torch.where(main_tok, ell, zero)
    L_main = _aggregate(ell, main_tok, main_rows, cfg.aggregation, num_items,
                        cfg.max_completion_length, "main")
    if cfg.demo_part == "sft":
        ell_d = torch.where(demo_tok, -lp, zero)
        L_demo = _aggregate(ell_d, demo_tok, demo_rows, cfg.demo_aggregation, None,
                            cfg.max_completion_length, "demo")
    elif cfg.demo_part == "shaped":
        p = torch.exp(lp)
        ell_d = torch.where(demo_tok, -adv * p / (p + cfg.shaping_gamma), zero)
        L_demo = _aggregate(ell_d, demo_tok, demo_rows, cfg.aggregation, None,
                            cfg.max_completion_length, "demo")
    else:
        L_demo = torch.zeros((), dtype=lp.dtype, device=lp.device)
    total = cfg.rl_coef * L_main + cfg.demo_coef * L_demo
    return total, (L_main.detach(), L_demo.detach()), aux


def _metrics(cfg, aux, parts, valid, main_tok, demo_tok, main_rows, demo_rows, adv, adv_per_row, ent,
             g_lp, g_H, have_ref):
    dt = ent.dtype
    mt = main_tok
    n_main = mt.sum().to(dt)
    n_main1 = n_main.clamp(min=1.0)
    n_valid = valid.sum().to(dt)

    def mmean(x):
        return torch.where(mt, x.to(dt), torch.zeros((), dtype=dt, device=x.device)).sum() / n_main1

    names, vals = [], []

    def put(name, v):
        names.append(name)
        vals.append(v.to(dt) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dt))

    put("loss_main", parts[0])
    put("loss_demo", parts[1])
    if "ratio" in aux:
        r = aux["ratio"]
        big = torch.tensor(torch.finfo(dt).max, dtype=dt, device=r.device)
        has = n_main > 0
        put("ratio_mean", torch.where(has, mmean(r), torch.ones((), dtype=dt, device=r.device)))
        one = torch.ones(1, dtype=dt, device=r.device)
        # the appended sentinel keeps min/max defined on an empty batch
        r_min = torch.cat([torch.where(mt, r, big).flatten(), big.view(1)]).min()
        r_max = torch.cat([torch.where(mt, r, -big).flatten(), -big.view(1)]).max()
        put("ratio_min", torch.where(has, r_min, one[0]))
        put("ratio_max", torch.where(has, r_max, one[0]))
        lo, hi = mmean(aux["clip_low"]), mmean(aux["clip_high"])
        put("clip_frac_low", lo)
        put("clip_frac_high", hi)
        put("clip_frac", lo + hi)
        put("dual_clip_frac", mmean(aux["dual"]))
    else:
        for n in ("ratio_mean", "ratio_min", "ratio_max"):
            put(n, 1.0)
        for n in ("clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac"):
            put(n, 0.0)
    put("kl_mean", mmean(aux["kl"]) if have_ref else 0.0)
    put("entropy_mean", torch.where(valid, ent, torch.zeros_like(ent)).sum() / n_valid.clamp(min=1.0))
    if adv_per_row:
        # per-row advantages (they were zeroed at invalid tokens): rows with a valid main token
        sel = main_rows & valid.any(-1)
        a = torch.where(valid, adv, torch.zeros_like(adv)).sum(-1) / valid.sum(-1).clamp(min=1).to(dt)
        n = sel.sum().to(dt).clamp(min=1.0)
        am = torch.where(sel, a, torch.zeros_like(a)).sum() / n
        av = torch.where(sel, (a - am) ** 2, torch.zeros_like(a)).sum() / n
    else:
        am = mmean(adv)
        av = mmean((adv - am) ** 2)
    put("adv_mean", am)
    put("adv_std", torch.sqrt(av))
    zero_coef = valid & (g_lp == 0) & (g_H == 0)
    put("zero_coef_frac", zero_coef.sum().to(dt) / n_valid.clamp(min=1.0))
    put("rollout_tokens", n_main)
    put("demo_tokens", demo_tok.sum().to(dt))
    put("rollout_rows", main_rows.sum().to(dt))
    put("demo_rows", demo_rows.sum().to(dt))
    put("sft_share", demo_rows.sum().to(dt) / max(demo_rows.numel(), 1))
    if "rollout_w" in aux:
        w = aux["rollout_w"]
        put("rollout_is_mean", mmean(w))
        put("rollout_is_zero_frac", mmean(w == 0))
    if "vespo_phi" in aux:
        put("vespo_phi_mean", mmean(aux["vespo_phi"]))
    dev = ent.device
    out = torch.stack([v.to(dev).reshape(()) for v in vals]).tolist()
    return dict(zip(names, (float(x) for x in out)))
