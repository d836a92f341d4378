"""Fused loss epilogue: split combine + the token-local policy loss and its coefficients in registers.

It replaces ``triton_logprobs_fwd.combine`` on the loss path (``unified_policy_loss`` with the
Triton backend and a token-local config; docs/losses.md "Fused epilogue"). Grid: blocks of
BLOCK tokens over the ``M`` non-ignored rows (the forward kernel's ``rows``). Per token it

1. combines the forward partials ``[4, splits, M]`` to ``lse``, entropy ``H``, ``logp`` (the same
   arithmetic as ``combine``: rescale each split to the global max, sum in split order);
2. sanitizes: ``logp``/``H`` are 0 outside the valid tokens (part code 0) and ``old``/``ref``/
   ``rollout``/``is_ratio`` are replaced by finite values outside the main part's tokens (a NaN
   there never enters a formula), exactly as the PyTorch epilogue does;
3. evaluates the per-token loss ``l`` of its part (main / demo SFT / demo shaped) and the closed-form
   derivatives ``dl/dlogp`` and ``dl/dH`` -- the same branch rules PyTorch autograd applies
   (``minimum`` splits a tie 1/2-1/2, ``clamp`` passes the gradient on its bounds);
4. writes ``ell = w * l`` (``w`` the aggregation weight of the token, computed on the host from the
   masks, 0 outside the valid tokens), ``g_lp = coef * w * dl/dlogp``, ``g_H = coef * w * dl/dH``
   (``coef`` = rl_coef for main tokens, demo_coef for demonstration tokens), the ratio, the KL
   value, the rollout IS weight and the clip flags (bit 0 low, bit 1 high, bit 2 dual) -- the
   quantities the PyTorch epilogue's metrics read.

Coefficients are selected with ``tl.where``: wherever ``coef * w == 0`` (masked, ignored tokens)
they are exactly 0, never ``0 * x``. Rows whose target is ``ignore_index`` are not visited: their
outputs keep the host's zeros.

Token-local only: sequence ratios (GSPO/LUSPO), VESPO's sequence weight and sequence rollout IS
need a per-sequence reduction of ``logp`` and stay on the PyTorch epilogue.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .epilogue_codes import (EpilogueParams, FLAG_DUAL, FLAG_HIGH, FLAG_LOW,  # noqa: F401 (re-export)
                             KL_CODES, LIKELIHOOD_CODES, PART_DEMO_SFT, PART_DEMO_SHAPED, PART_MAIN,
                             PART_NONE, REFERENCE_CODES, ROLLOUT_CODES, SCALAR_FIELDS,
                             STABILIZATION_CODES)
from .aot import KernelVariant, flag_cover
from .meta import launch
from .triton_logprobs_common import interpreting

@triton.jit
def _epilogue_kernel(part_ptr, rows_ptr, M, n_splits,
                     old_ptr, ref_ptr, rol_ptr, adv_ptr, isr_ptr, w_ptr, code_ptr,
                     logp_ptr, ent_ptr, lse_ptr, ell_ptr, glp_ptr, gh_ptr, ratio_ptr, kl_ptr,
                     rollw_ptr, flags_ptr,
                     eps_low, eps_high, delta, dual_clip, tau_pos, tau_neg, kl_coef, entropy_coef,
                     log_cap, fdiv_beta, shaping_gamma, rl_coef, demo_coef,
                     STAB: tl.constexpr, REF: tl.constexpr, LIK: tl.constexpr,
                     KL_TYPE: tl.constexpr, KL_ON: tl.constexpr, KL_BC: tl.constexpr,
                     ROLL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr,
                     HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ROL: tl.constexpr,
                     HAS_ISR: tl.constexpr, ENT_ON: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mk = offs < M
    row = tl.load(rows_ptr + offs, mask=mk, other=0)

    # ---------------------------------------------------------------- combine the splits
    stride_s = tl.full((), 0, tl.int64) + M                # int64 offsets even if M is specialized
    stride_j = stride_s * n_splits
    mx = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(n_splits):
        mx = tl.maximum(mx, tl.load(part_ptr + s * stride_s + offs, mask=mk, other=0.0))
    s_tot = tl.zeros((BLOCK,), tl.float32)
    t_tot = tl.zeros((BLOCK,), tl.float32)
    zt = tl.zeros((BLOCK,), tl.float32)
    for s in range(n_splits):
        base = part_ptr + s * stride_s + offs
        m_s = tl.load(base, mask=mk, other=0.0)
        s_s = tl.load(base + stride_j, mask=mk, other=1.0)
        t_s = tl.load(base + 2 * stride_j, mask=mk, other=0.0)
        z_s = tl.load(base + 3 * stride_j, mask=mk, other=0.0)
        alpha = tl.exp(m_s - mx)
        s_tot += alpha * s_s
        t_tot += alpha * (t_s + tl.where(s_s > 0, (m_s - mx) * s_s, 0.0))   # s_s = 0: m_s = -inf
        zt += z_s
    log_s = tl.log(s_tot)
    lse = mx + log_s
    ent = log_s - t_tot / s_tot
    logp = zt - lse
    tl.store(lse_ptr + row, lse, mask=mk)
    tl.store(ent_ptr + row, ent, mask=mk)
    tl.store(logp_ptr + row, logp, mask=mk)

    # ---------------------------------------------------------------- sanitized per-token inputs
    code = tl.load(code_ptr + row, mask=mk, other=0).to(tl.int32)
    valid = code != 0
    is_main = code == 1
    w = tl.load(w_ptr + row, mask=mk, other=0.0)
    A = tl.load(adv_ptr + row, mask=mk, other=0.0)
    A = tl.where(valid, A, 0.0)
    lp = tl.where(valid, logp, 0.0)
    H = tl.where(valid, ent, 0.0)
    zero = tl.zeros((BLOCK,), tl.float32)
    one = zero + 1.0
    old = lp
    if HAS_OLD:
        old = tl.where(is_main, tl.load(old_ptr + row, mask=mk & is_main, other=0.0), lp)
    ref = lp
    if HAS_REF:
        ref = tl.where(is_main, tl.load(ref_ptr + row, mask=mk & is_main, other=0.0), lp)
    p = tl.exp(lp)
    flags = tl.zeros((BLOCK,), tl.int32)

    # ---------------------------------------------------------------- main part: l and dl/dlogp
    r = one
    if REF == 1:                       # ratio pi / pi_old
        r = tl.exp(tl.where(is_main, lp - old, 0.0))
        if STAB == 0:
            ell = -r * A
            d = -A * r
        elif STAB == 1:                # PPO clip (+ delta, + dual clip)
            lo = 1.0 - eps_low
            hi = 1.0 + eps_high
            r1 = r
            dr1 = one
            if HAS_DELTA:
                r1 = tl.minimum(r, delta)
                dr1 = tl.where(r <= delta, 1.0, 0.0)
            rc = tl.minimum(tl.maximum(r, lo), hi)
            drc = tl.where((r >= lo) & (r <= hi), 1.0, 0.0)
            a = r1 * A
            b = rc * A
            fa = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
            fb = tl.where(b < a, 1.0, tl.where(a == b, 0.5, 0.0))
            ell = -tl.minimum(a, b)
            d = -(fa * A * dr1 + fb * A * drc) * r
            flags = tl.where((r < lo) & (A < 0), flags | 1, flags)
            flags = tl.where((r > hi) & (A > 0), flags | 2, flags)
            if HAS_DUAL:
                cap = -dual_clip * A
                neg = A < 0
                flags = tl.where(neg & (ell > cap), flags | 4, flags)
                fd = tl.where(ell < cap, 1.0, tl.where(ell == cap, 0.5, 0.0))
                d = tl.where(neg, fd * d, d)
                ell = tl.where(neg, tl.minimum(ell, cap), ell)
        elif STAB == 2:                # CISPO
            wc = tl.minimum(r, eps_high)
            ell = -wc * A * lp
            d = -wc * A
            flags = tl.where((r > eps_high) & (A > 0), flags | 2, flags)
        else:                          # SAPO
            tau = tl.where(A > 0, tau_pos, tau_neg)
            sg = tl.sigmoid(tau * (r - 1.0))
            ell = -(4.0 / tau) * sg * A
            d = -(4.0 / tau) * A * (sg * (1.0 - sg) * tau) * r
    elif REF == 0:                     # pi_theta: grad log pi with a likelihood transform
        if LIK == 0:
            ell = -A * lp
            d = -A
        elif LIK == 1:                 # DFT: sg(p) logp
            ell = -A * (p * lp)
            d = -A * p
        elif LIK == 2:                 # chi^2
            u = fdiv_beta * (lp - ref)
            q = p * u * u / (4.0 * fdiv_beta)
            ell = -A * (lp - q)
            d = -A * (1.0 - q - p * 2.0 * u * fdiv_beta / (4.0 * fdiv_beta))
        else:                          # squared Hellinger, u capped at 1/2
            u0 = fdiv_beta * (lp - ref)
            u = tl.minimum(u0, 0.5)
            du = tl.where(u0 <= 0.5, 1.0, 0.0)
            q = p * u * u / ((1.0 - u) * fdiv_beta)
            ell = -A * (lp - q)
            d = -A * (1.0 - q - p * du * (2.0 * u - u * u) / ((1.0 - u) * (1.0 - u)))
    elif REF == 2:                     # 1: grad pi
        ell = -A * p
        d = -A * p
    else:                              # shaped pi + gamma
        ell = -A * p / (p + shaping_gamma)
        d = -A * (shaping_gamma * p / ((p + shaping_gamma) * (p + shaping_gamma)))

    rollw = one
    if ROLL != 0:
        rol = old
        if HAS_ROL:
            rol = tl.where(is_main, tl.load(rol_ptr + row, mask=mk & is_main, other=0.0), old)
        log_w = tl.where(is_main, old - rol, 0.0)
        rollw = tl.exp(tl.minimum(log_w, log_cap))
        if ROLL == 2:
            rollw = tl.where(log_w <= log_cap, rollw, 0.0)
        ell = ell * rollw
        d = d * rollw
    if HAS_ISR:
        isr = tl.where(is_main, tl.load(isr_ptr + row, mask=mk & is_main, other=1.0), 1.0)
        ell = ell * isr
        d = d * isr

    dd = lp - ref
    if KL_TYPE == 1:
        kl = dd
        dk = one
    elif KL_TYPE == 2:
        kl = 0.5 * dd * dd
        dk = dd
    else:
        e = tl.exp(-dd)
        kl = e + dd - 1.0
        dk = 1.0 - e
    if KL_BC:
        dk = dk * r + kl * r
        kl = kl * r
    if KL_ON:
        ell = ell + kl_coef * kl
        d = d + kl_coef * dk
    dh = zero
    if ENT_ON:
        ell = ell - entropy_coef * H
        dh = zero - entropy_coef

    # ---------------------------------------------------------------- demonstration parts
    ell = tl.where(code == 2, -lp, ell)
    d = tl.where(code == 2, -1.0, d)
    p_sh = p / (p + shaping_gamma)
    ell = tl.where(code == 3, -A * p_sh, ell)
    d = tl.where(code == 3, -A * (shaping_gamma * p / ((p + shaping_gamma) * (p + shaping_gamma))), d)
    dh = tl.where(is_main, dh, 0.0)

    # ---------------------------------------------------------------- outputs (exact zeros)
    wc = tl.where(is_main, rl_coef, demo_coef) * w
    live = valid & (wc != 0)
    tl.store(ell_ptr + row, tl.where(valid, w * ell, 0.0), mask=mk)
    tl.store(glp_ptr + row, tl.where(live, wc * d, 0.0), mask=mk)
    tl.store(gh_ptr + row, tl.where(live, wc * dh, 0.0), mask=mk)
    tl.store(ratio_ptr + row, r, mask=mk)
    tl.store(kl_ptr + row, kl, mask=mk)
    tl.store(rollw_ptr + row, rollw, mask=mk)
    tl.store(flags_ptr + row, tl.where(is_main, flags, 0).to(tl.int8), mask=mk)


EPILOGUE_WARPS, EPILOGUE_STAGES = 4, 3


def epilogue_constexprs(prm: EpilogueParams, *, has_old, has_ref, has_rol, has_isr) -> dict:
    """The constexpr arguments of ``_epilogue_kernel`` (the launcher and :func:`aot_variants`): the
    mode fields' (``EpilogueParams.mode_constexprs``), the flags of optional inputs and terms."""
    return dict(**prm.mode_constexprs(), KL_ON=prm.kl_coef > 0,
                HAS_DELTA=bool(prm.delta), HAS_DUAL=bool(prm.dual_clip),
                HAS_OLD=has_old, HAS_REF=has_ref, HAS_ROL=has_rol, HAS_ISR=has_isr,
                ENT_ON=prm.entropy_coef > 0, BLOCK=16 if interpreting() else 256)


def aot_variants() -> list[KernelVariant]:
    """A covering set (the full product is in the tens of thousands): the GRPO case (PPO clip on
    the ratio to old), each mode / flag changed alone, all flags on, and ``reference="current"``
    with each likelihood transform (LIK only matters there)."""
    grpo = dict(stabilization=1, reference=1, likelihood=0, kl_type=3, rollout_is=0,
                kl_bias_correction=False, delta=False, dual_clip=False, kl=False, entropy=False,
                old=True, ref=False, rol=False, isr=False)
    values = dict(stabilization=(1, 0, 2, 3), reference=(1, 0, 2, 3), kl_type=(3, 1, 2),
                  rollout_is=(0, 1, 2), **{k: (False, True) for k in (
                      "kl_bias_correction", "delta", "dual_clip", "kl", "entropy", "old", "ref",
                      "rol", "isr")})
    cover = flag_cover(values, grpo)
    cover += [{**grpo, "reference": 0, "likelihood": lk, "old": False} for lk in (1, 2, 3)]
    types = {a: "*fp32" for a in ("old_ptr", "ref_ptr", "rol_ptr", "adv_ptr", "isr_ptr", "w_ptr",
                                  "logp_ptr", "ent_ptr", "lse_ptr", "ell_ptr", "glp_ptr", "gh_ptr",
                                  "ratio_ptr", "kl_ptr", "rollw_ptr", "part_ptr")}
    types.update(rows_ptr="*i64", code_ptr="*i8", flags_ptr="*i8", M="i32", n_splits="i32")
    types.update({a: "fp32" for a in SCALAR_FIELDS})      # the scalar arguments, by name
    out = []
    for c in cover:
        prm = EpilogueParams(stabilization=c["stabilization"], reference=c["reference"],
                             likelihood=c["likelihood"], kl_type=c["kl_type"],
                             rollout_is=c["rollout_is"], kl_bias_correction=c["kl_bias_correction"],
                             delta=1.5 if c["delta"] else 0.0,
                             dual_clip=3.0 if c["dual_clip"] else 0.0,
                             kl_coef=0.1 if c["kl"] else 0.0,
                             entropy_coef=0.01 if c["entropy"] else 0.0)
        cx = epilogue_constexprs(prm, has_old=c["old"], has_ref=c["ref"], has_rol=c["rol"],
                                 has_isr=c["isr"])
        changed = {k: v for k, v in c.items() if v != grpo[k]}
        name = " ".join(["grpo"] + [k if v is True else f"no_{k}" if v is False else f"{k}={v}"
                                    for k, v in changed.items()])
        out.append(KernelVariant(_epilogue_kernel, name, types, cx, EPILOGUE_WARPS, EPILOGUE_STAGES,
                                 divisible=tuple(a for a in types if a.endswith("_ptr"))))
    return out


def epilogue(part, rows, N, *, old, ref, rol, adv, isr, w, code, params: EpilogueParams):
    """Combine the forward partials and apply the loss epilogue.

    ``part [4, splits, M]`` and ``rows [M]`` from ``triton_logprobs_fwd.forward_partials`` (``part``
    None: every row ignored). Per-token float32 ``[N]`` inputs ``old``, ``ref``, ``rol``, ``isr``
    (each optional), ``adv``, ``w`` and the int8 part ``code``. Returns the float32 ``[N]`` tensors
    ``(logp, ent, lse, ell, g_lp, g_H, ratio, kl, rollout_w)`` and int8 ``flags [N]``; ignored
    rows hold 0 in all of them."""
    dev = adv.device
    outs = [torch.zeros(N, dtype=torch.float32, device=dev) for _ in range(9)]
    flags = torch.zeros(N, dtype=torch.int8, device=dev)
    if part is None or rows.numel() == 0:
        return (*outs, flags)
    M = rows.numel()
    splits = part.shape[1]
    prm = params

    def f32(x):
        return None if x is None else x.to(torch.float32).contiguous()

    old, ref, rol, isr, adv, w = map(f32, (old, ref, rol, isr, adv, w))
    dummy = adv
    flags_cx = epilogue_constexprs(prm, has_old=old is not None, has_ref=ref is not None,
                                   has_rol=rol is not None, has_isr=isr is not None)
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        launch(_epilogue_kernel, (triton.cdiv(M, flags_cx["BLOCK"]),),
               part, rows, M, splits,
               old if old is not None else dummy, ref if ref is not None else dummy,
               rol if rol is not None else dummy, adv, isr if isr is not None else dummy, w,
               code.contiguous(), *outs, flags, **prm.kernel_scalars(), **flags_cx,
               num_warps=EPILOGUE_WARPS,
               num_stages=EPILOGUE_STAGES)
    return (*outs, flags)
