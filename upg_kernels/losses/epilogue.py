"""The PyTorch epilogue of the unified loss: per-token losses, aggregation, coefficients, metrics.

Input: per-token ``logp`` and entropy ``H`` ``[B, T]`` and the checked :class:`LossInputs`. The loss
is built on detached leaf copies; autograd over those ``[B, T]`` scalars gives the exact per-token
coefficients ``g_lp = dL/dlogp`` and ``g_H = dL/dH`` (:func:`pytorch_coefficients`), which the loss
op hands to the kernel backward. Masked positions are sanitized before they enter any formula and
every masked / clipped coefficient is exactly 0 (``torch.where``), so the kernel skips those rows.
This is the general path (every preset) and the oracle of the fused Triton epilogue.
"""
from __future__ import annotations

import math

import torch

from ..parallel.comm import cp_min_max, cp_sum, seq_sum
from .aggregation import part_weights
from .inputs import LossInputs


def _aggregate(loss_bt, cfg, inp, part):
    """Aggregate per-token losses (already 0 outside the part's tokens) with the part's weights."""
    return (part_weights(cfg, inp, part, dtype=loss_bt.dtype) * loss_bt).sum()


def kl_estimate(d, kind):
    """The KL estimator ``kind`` (k1 / k2 / k3) of ``d = logp - ref_logp``, per token."""
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


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


def _rollout_weight(cfg, old, rol, main_tok, cp=None):
    """The detached sampler-vs-trainer IS weight of ``cfg.rollout_is`` (token or per-sequence, broadcast)."""
    log_w = torch.where(main_tok, old - rol, torch.zeros_like(old))
    if cfg.rollout_is.startswith("sequence"):
        log_w = seq_sum(log_w, cp).expand_as(old)
    log_cap = math.log(cfg.rollout_is_cap)
    w_trunc = torch.exp(torch.clamp(log_w, max=log_cap))
    if cfg.rollout_is.endswith("truncate"):
        w = w_trunc
    else:
        w = torch.where(log_w <= log_cap, w_trunc, torch.zeros_like(w_trunc))
    return w.detach()


def _main_token_loss(cfg, lp, H, old, ref, rol, isr_pair, adv, valid, main_tok, cp=None):
    """Per-token loss of the main part (before masking) and auxiliaries for the metrics. ``cp``: the
    context-parallel group; every sum over a sequence goes through :func:`seq_sum`."""
    isr, isr_rows = isr_pair
    aux = {}
    A = adv
    p = torch.exp(lp)
    one = torch.ones_like(lp)
    w_roll = None
    if cfg.rollout_is is not None and rol is not None:
        w_roll = _rollout_weight(cfg, old, rol, main_tok, cp)
        aux["rollout_w"] = w_roll
    r = None
    if cfg.reference == "old":
        log_ratio = torch.where(main_tok, lp - old, torch.zeros_like(lp))
        if cfg.ratio_level == "sequence":
            n = seq_sum(main_tok.to(lp.dtype), cp).clamp(min=1.0)
            log_ratio = (seq_sum(log_ratio, cp) / n).expand_as(lp)
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
                s_tok = torch.where(main_tok, torch.clamp(lp - old, -20.0, 20.0), zero)
                if isr_rows is None and isr is not None:
                    s_tok = s_tok + torch.where(main_tok, torch.clamp(torch.log(isr), _VESPO_LOG_FLOOR, 20.0),
                                                zero)
                if w_roll is not None:
                    s_tok = s_tok + torch.where(main_tok, torch.clamp(torch.log(w_roll), _VESPO_LOG_FLOOR,
                                                                      20.0), zero)
                s = seq_sum(s_tok, cp)
                if isr_rows is not None:
                    s = s + torch.clamp(torch.log(isr_rows), _VESPO_LOG_FLOOR, 20.0)
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
        kl = kl_estimate(lp - ref, cfg.kl_type)
        if cfg.kl_bias_correction:
            kl = kl * r
        loss = loss + cfg.kl_coef * kl
    kl_m = kl_estimate(lp - ref, cfg.kl_type).detach()
    if cfg.kl_bias_correction:
        kl_m = kl_m * r.detach()
    aux["kl"] = kl_m
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * H
    return loss, aux


def _epilogue(cfg, inp: LossInputs, lp, H, old, ref, rol):
    zero = torch.zeros_like(lp)
    main_tok, demo_tok, adv = inp.main_tok, inp.demo_tok, inp.adv
    ell, aux = _main_token_loss(cfg, lp, H, old, ref, rol, (inp.isr, inp.isr_rows), adv, inp.valid,
                                main_tok, inp.cp_group)
    ell = torch.where(main_tok, ell, zero)
    L_main = _aggregate(ell, cfg, inp, "main")
    if cfg.demo_part == "sft":
        L_demo = _aggregate(torch.where(demo_tok, -lp, zero), cfg, inp, "demo")
    elif cfg.demo_part == "shaped":
        p = torch.exp(lp)
        L_demo = _aggregate(torch.where(demo_tok, -adv * p / (p + cfg.shaping_gamma), zero), cfg, inp,
                            "demo")
    else:
        L_demo = torch.zeros((), dtype=lp.dtype, device=lp.device)
    total = cfg.rl_coef * L_main + cfg.demo_coef * L_demo
    return total, (L_main.detach(), L_demo.detach()), aux


def pytorch_coefficients(cfg, inp: LossInputs, logp_bt, ent_bt):
    """``(total, parts, aux, g_lp, g_H, ent_d)`` from detached ``[B, T]`` log-probs and entropy.

    ``total`` is the detached loss, ``parts`` the detached (main, demo) losses, ``aux`` the per-token
    auxiliaries for the metrics, ``g_lp``/``g_H`` the coefficients (0 outside the valid tokens) and
    ``ent_d`` the sanitized entropy."""
    valid, main_tok = inp.valid, inp.main_tok
    # outside the valid tokens logp/H are replaced by 0 (a garbage hidden state at a masked
    # position cannot reach the loss or the coefficients)
    lp_d = torch.where(valid, logp_bt.detach(), torch.zeros_like(logp_bt))
    ent_d = torch.where(valid, ent_bt.detach(), torch.zeros_like(ent_bt))
    # old/ref/rollout/is_ratio feed only the main part: outside its valid tokens (masked tokens and
    # demonstration rows, which often carry no sampler log-probs) they are replaced by finite values
    old = lp_d if inp.old is None else torch.where(main_tok, inp.old, lp_d)
    ref = lp_d if inp.ref is None else torch.where(main_tok, inp.ref, lp_d)
    rol = None if inp.rol is None else torch.where(main_tok, inp.rol, old)
    with torch.enable_grad():
        lp = lp_d.clone().requires_grad_(True)
        H = ent_d.clone().requires_grad_(True)
        total, parts, aux = _epilogue(cfg, inp, lp, H, old, ref, rol)
        g_lp, g_H = torch.autograd.grad(total, [lp, H], allow_unused=True)
    g_lp = torch.zeros_like(lp_d) if g_lp is None else g_lp.detach()
    g_H = torch.zeros_like(lp_d) if g_H is None else g_H.detach()
    return total.detach(), parts, aux, g_lp, g_H, ent_d


def loss_metrics(cfg, inp: LossInputs, aux, parts, ent_d, g_lp, g_H) -> dict:
    """The metrics dict (python floats, one device sync) of one loss call."""
    return _metrics(cfg, aux, parts, inp.valid, inp.main_tok, inp.demo_tok, inp.main_rows,
                    inp.demo_rows, inp.adv, inp.adv_per_row, ent_d, g_lp, g_H, inp.have_ref, inp.cp_group)


def _metrics(cfg, aux, parts, valid, main_tok, demo_tok, main_rows, demo_rows, adv, adv_per_row, ent,
             g_lp, g_H, have_ref, cp=None):
    """Under context parallelism (``cp``) every token sum is completed over the group (:func:`cp_sum`),
    so every rank reports the metrics of the whole sequences (``loss_*``: the sum of the ranks' parts)."""
    dt = ent.dtype
    mt = main_tok
    n_main = cp_sum(mt.sum().to(dt), cp)
    n_main1 = n_main.clamp(min=1.0)
    n_valid = cp_sum(valid.sum().to(dt), cp)

    def mmean(x):
        return cp_sum(torch.where(mt, x.to(dt), torch.zeros((), dtype=dt, device=x.device)).sum(), cp) / n_main1

    names, vals = [], []

    def put(name, v):
        names.append(name)
        vals.append(v.to(dt) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dt))

    put("loss_main", cp_sum(parts[0], cp))
    put("loss_demo", cp_sum(parts[1], cp))
    if "ratio" in aux:
        r = aux["ratio"]
        big = torch.tensor(torch.finfo(dt).max, dtype=dt, device=r.device)
        has = n_main > 0
        put("ratio_mean", torch.where(has, mmean(r), torch.ones((), dtype=dt, device=r.device)))
        one = torch.ones(1, dtype=dt, device=r.device)
        # the appended sentinel keeps min/max defined on an empty batch
        r_min = torch.cat([torch.where(mt, r, big).flatten(), big.view(1)]).min()
        r_max = torch.cat([torch.where(mt, r, -big).flatten(), -big.view(1)]).max()
        r_min, r_max = cp_min_max(r_min, r_max, cp)
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
    put("entropy_mean", cp_sum(torch.where(valid, ent, torch.zeros_like(ent)).sum(), cp) / n_valid.clamp(min=1.0))
    if adv_per_row:
        # per-row advantages (they were zeroed at invalid tokens): rows with a valid main token
        n_row = seq_sum(valid.to(dt), cp)[:, 0]
        sel = main_rows & (n_row > 0)
        a = seq_sum(torch.where(valid, adv, torch.zeros_like(adv)), cp)[:, 0] / n_row.clamp(min=1.0)
        n = sel.sum().to(dt).clamp(min=1.0)
        am = torch.where(sel, a, torch.zeros_like(a)).sum() / n
        av = torch.where(sel, (a - am) ** 2, torch.zeros_like(a)).sum() / n
    else:
        am = mmean(adv)
        av = mmean((adv - am) ** 2)
    put("adv_mean", am)
    put("adv_std", torch.sqrt(av))
    zero_coef = valid & (g_lp == 0) & (g_H == 0)
    put("zero_coef_frac", cp_sum(zero_coef.sum().to(dt), cp) / n_valid.clamp(min=1.0))
    put("rollout_tokens", n_main)
    put("demo_tokens", cp_sum(demo_tok.sum().to(dt), cp))
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
    if dev.type == "meta":            # shape-only runs (the memory model): no values
        return dict.fromkeys(names, float("nan"))
    out = torch.stack([v.to(dev).reshape(()) for v in vals]).tolist()
    return dict(zip(names, (float(x) for x in out)))
