"""Backward: recompute each logits tile, form dz on chip, accumulate dhidden / dweight / dbias.

Backend ``"triton_atomic"`` (the CUDA default is ``gemm_backward``). Only the active rows run:
``targets != ignore_index`` and a non-zero ``g_logp``, ``g_ent`` or ``g_lse`` (exact;
``kernels.active_rows`` compacts them into an index list). Grid: one program per (token block, vocabulary tile) of a
vocabulary slab, in a grouped (swizzled) order for L2 reuse. Each program

1. recomputes ``z`` for its tile (``tl.dot`` over H, fp32 accumulation) and forms
   ``dz = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / temperature`` (times ``1 - tanh^2``
   with a softcap), masked to the valid rows and columns;
2. optionally skips the rest when every ``|dz| <= filter_eps * (|g_logp| + |g_ent|) / T`` of its row
   (tile filtering, relative like CCE's filter on the softmax gradient);
3. ``dh[block] += dz @ W[tile]`` and ``dW[tile] += dz^T @ h[block]`` chunk by chunk of H with
   float32 ``atomic_add`` (``dz`` is cast to the input dtype for the tensor cores), and
   ``db[tile] += sum_rows dz``.

Buffers: dhidden accumulates in a float32 ``[M, H]`` buffer (M = active rows); dweight in a float32
slab of ``slab_rows x H`` per launch (the output itself for float32 weights), cast into the output
slab by slab, so the float32 copy of a ``[V, H]`` weight gradient never exists at once.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
import triton
import triton.language as tl

from ..settings import TRITON_DW_SLAB_BYTES
from .capturable import backward_rows
from .contract import zero_grads
from .aot import (DTYPE_NAMES, EVEN_H_EXAMPLE, GPU_DTYPES, ODD_H_EXAMPLE, KernelVariant,
                  flag_cover, fp32_weight, label, ptr, tail)
from .meta import launch
from .triton_logprobs_common import (bwd_config, check_inputs, dot, dot_precision, grad_tile,
                                     num_sms, operand, upcast_dot)

# float32 dweight accumulation buffer per launch (bf16/fp16 weights); see docs/kernels.md
DW_SLAB_BYTES = 16 * 2**20


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr,
                dh_ptr, dw_ptr, db_ptr,
                M, H, stride_h, stride_w, v_lo, v_hi, temperature, softcap, filter_eps,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
                HAS_GLSE: tl.constexpr, EVEN_H: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                DH_DIRECT: tl.constexpr, NEED_H: tl.constexpr,
                NEED_W: tl.constexpr, NEED_B: tl.constexpr, FILTER: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                GROUP_N: tl.constexpr):
    dz, offs_m, mask_m, rows, v0, cols, mask_v, gl, gp, ge = grad_tile(
        tl.program_id(0), M, v_lo, v_hi, h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr,
        gl_ptr, ge_ptr, gs_ptr, H, stride_h, stride_w, temperature, softcap, HAS_BIAS, HAS_SOFTCAP,
        HAS_GENT, HAS_GLSE, EVEN_H, PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N)

    keep = True
    if FILTER:   # relative to the row's coefficient: |dz| <= eps * (|g_logp| + |g_ent|) / T is skipped
        coef = tl.abs(gl)
        if HAS_GENT:
            coef += tl.abs(ge)
        if HAS_GLSE:
            coef += tl.abs(gl - gp)
        thr = filter_eps * coef / temperature
        keep = tl.max(tl.max(tl.abs(dz) - thr[:, None], 1), 0) > 0.0
    if keep:
        if NEED_B:
            tl.atomic_add(db_ptr + v0 + cols, tl.sum(dz, 0), mask=mask_v, sem="relaxed")
        dzc = dz.to(h_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_H)
        if NEED_H:
            w_ptrs = (w_ptr + v0 * stride_w) + cols[:, None] * stride_w + offs_k[None, :]
            if DH_DIRECT:   # float32 hidden: straight into the [N, H] output at the row ids
                dh_ptrs = dh_ptr + rows[:, None] * H + offs_k[None, :]
            else:           # compact [M, H] float32 buffer
                dh_ptrs = dh_ptr + offs_m[:, None] * H + offs_k[None, :]
            for k in range(0, H, BLOCK_H):
                if EVEN_H:
                    w = operand(tl.load(w_ptrs, mask=mask_v[:, None], other=0.0), h_ptr.dtype.element_ty,
                                UPCAST)
                    tl.atomic_add(dh_ptrs, dot(dzc, w, None, PREC, UPCAST),
                                  mask=mask_m[:, None], sem="relaxed")
                else:
                    kmask = offs_k + k < H
                    w = operand(tl.load(w_ptrs, mask=mask_v[:, None] & kmask[None, :], other=0.0),
                                h_ptr.dtype.element_ty, UPCAST)
                    tl.atomic_add(dh_ptrs, dot(dzc, w, None, PREC, UPCAST),
                                  mask=mask_m[:, None] & kmask[None, :], sem="relaxed")
                w_ptrs += BLOCK_H
                dh_ptrs += BLOCK_H
        if NEED_W:
            h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
            dw_ptrs = (dw_ptr + (v0 - v_lo) * H) + cols[:, None] * H + offs_k[None, :]  # fp32 slab
            dzt = tl.trans(dzc)
            for k in range(0, H, BLOCK_H):
                if EVEN_H:
                    h = tl.load(h_ptrs, mask=mask_m[:, None], other=0.0)
                    tl.atomic_add(dw_ptrs, dot(dzt, h, None, PREC, UPCAST),
                                  mask=mask_v[:, None], sem="relaxed")
                else:
                    kmask = offs_k + k < H
                    h = tl.load(h_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
                    tl.atomic_add(dw_ptrs, dot(dzt, h, None, PREC, UPCAST),
                                  mask=mask_v[:, None] & kmask[None, :], sem="relaxed")
                h_ptrs += BLOCK_H
                dw_ptrs += BLOCK_H


def _slab_rows(V: int, H: int, block_v: int, n_blocks: int = 1 << 30, sms: int = 1) -> int:
    """Vocabulary rows per backward launch: ``DW_SLAB_BYTES`` of float32 dW, grown (up to 4x)
    when few token blocks would leave the GPU under two waves of programs."""
    budget = TRITON_DW_SLAB_BYTES.get() or DW_SLAB_BYTES
    row_bytes = 4 * max(H, 1)
    rows = max(block_v, (budget // row_bytes) // block_v * block_v)
    fill = triton.cdiv(2 * sms, n_blocks) * block_v
    if fill > rows and not TRITON_DW_SLAB_BYTES.is_set():
        rows = max(rows, min(fill, (4 * budget // row_bytes) // block_v * block_v))
    return min(rows, triton.cdiv(V, block_v) * block_v)


def bwd_constexprs(cfg, dtype, *, has_bias, has_softcap, has_gent, has_glse, even_h, need_h, need_w,
                   need_b, filter) -> dict:
    """The constexpr arguments of ``_bwd_kernel`` for a launch (the launcher and
    :func:`aot_variants` both call this)."""
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, HAS_GENT=has_gent, HAS_GLSE=has_glse,
                EVEN_H=even_h,
                PREC=dot_precision(dtype), UPCAST=upcast_dot(), DH_DIRECT=dtype == torch.float32,
                NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, FILTER=filter,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n)


# which gradients a launch computes (bias ones need HAS_BIAS)
_NEEDS = {"hw": (True, True, False), "h": (True, False, False), "w": (False, True, False),
          "hwb": (True, True, True), "b": (False, False, True)}
POINTERS = ("h_ptr", "w_ptr", "b_ptr", "tgt_ptr", "rows_ptr", "lse_ptr", "ent_ptr", "gl_ptr",
            "ge_ptr", "gs_ptr", "dh_ptr", "dw_ptr", "db_ptr")


def aot_variants() -> list[KernelVariant]:
    """A covering set of what ``backward`` can launch (the full product is 320 per dtype): for bf16
    and fp32, the common case (no bias / softcap / filter, entropy gradient on, even H, dhidden +
    dweight), each flag flipped alone, and all flags on (``aot.flag_cover``); fp16 (the bf16 code
    with another element type) the common case and all on. ``bwd_config(dtype, H, softcap)``'s GPU block
    config. Integers are specialized as at real shapes (M, v_lo, v_hi multiples of 16; a ``tail``
    variant of the common case covers other M). Autocast's bf16 hidden states with a float32 weight
    (``aot.fp32_weight``): the common case and all on."""
    base = dict(bias=False, softcap=False, gent=True, glse=False, even_h=True, filter=False,
                need="hw")
    cover = flag_cover(dict(bias=(False, True), softcap=(False, True), gent=(True, False),
                            glse=(False, True), even_h=(True, False), filter=(False, True),
                            need=("hw", "h", "w", "b", "hwb")), base)
    out = []
    for dt in GPU_DTYPES:
        acc = "*fp32"   # dh / dw / db accumulate in float32 buffers (or the fp32 outputs)
        types = dict(h_ptr=ptr(dt), w_ptr=ptr(dt), b_ptr=None, tgt_ptr="*i64",
                     rows_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", gl_ptr="*fp32",
                     ge_ptr="*fp32", gs_ptr="*fp32", dh_ptr=acc, dw_ptr=acc, db_ptr=acc, M="i32", H="i32",
                     stride_h="i32", stride_w="i32", v_lo="i32", v_hi="i32", temperature="fp32",
                     softcap="fp32", filter_eps="fp32")
        for c in (cover if dt != torch.float16 else (cover[0], cover[-1])):
            need_h, need_w, need_b = _NEEDS[c["need"]]
            cfg = bwd_config(dt, EVEN_H_EXAMPLE if c["even_h"] else ODD_H_EXAMPLE, c["softcap"])
            bias = c["bias"] or need_b
            types["b_ptr"] = ptr(dt) if bias else "*fp32"     # no bias: the launcher passes lse
            flags = dict(has_bias=bias, has_softcap=c["softcap"], has_gent=c["gent"],
                         has_glse=c["glse"], even_h=c["even_h"], need_h=need_h, need_w=need_w, need_b=need_b,
                         filter=c["filter"])
            name = label({"bias": bias, "softcap": c["softcap"], "no_gent": not c["gent"],
                          "glse": c["glse"],
                          "odd_h": not c["even_h"], "filter": c["filter"],
                          "need": c["need"]}, DTYPE_NAMES[dt])
            out.append(KernelVariant(
                _bwd_kernel, name, dict(types), bwd_constexprs(cfg, dt, **flags), cfg.num_warps,
                cfg.num_stages,
                divisible=POINTERS + ("M", "v_lo", "v_hi")
                + (("H", "stride_h", "stride_w") if c["even_h"] else ())))
            if c == base:
                out.append(tail(out[-1], "M"))
            if dt == torch.bfloat16 and c in (base, cover[-1]):     # its own block config
                cw = bwd_config(dt, EVEN_H_EXAMPLE if c["even_h"] else ODD_H_EXAMPLE, c["softcap"],
                                cast_weight=True)
                out.append(replace(fp32_weight(out[-2 if c == base else -1]),
                                   constexprs=bwd_constexprs(cw, dt, **flags), num_warps=cw.num_warps,
                                   num_stages=cw.num_stages))
    return out


def backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
             need_hidden=True, need_weight=True, need_bias=True, g_lse=None):
    check_inputs(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dh, dw, db, need_bias = zero_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    bias = None if bias is None else bias.contiguous()
    targets = targets.contiguous()
    if not (need_hidden or need_weight or need_bias):
        return dh, dw, db

    hidden, targets, lse, ent, rows, g_logp, g_ent, g_lse = backward_rows(
        hidden, targets, lse, ent, g_logp, g_ent, g_lse, p)
    M = rows.numel()
    if M == 0:
        return dh, dw, db

    cfg = bwd_config(hidden.dtype, H, bool(p.softcap), cast_weight=weight.dtype != hidden.dtype)
    lse = lse.to(torch.float32).contiguous()
    ent = ent.to(torch.float32).contiguous()
    h_fp32 = hidden.dtype == torch.float32
    dh_buf = None
    if need_hidden:
        dh_buf = dh if h_fp32 else torch.zeros(M, H, dtype=torch.float32, device=dev)
    db_buf = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None
    w_fp32 = weight.dtype == torch.float32
    n_blocks = triton.cdiv(M, cfg.block_n)
    slab = (_slab_rows(V, H, cfg.block_v, n_blocks, num_sms(dev)) if need_weight
            else triton.cdiv(V, cfg.block_v) * cfg.block_v)
    dw_buf = None
    if need_weight and not w_fp32:
        dw_buf = torch.empty(min(slab, V), H, dtype=torch.float32, device=dev)
    dummy = lse  # any tensor for pointers that a constexpr flag leaves unused
    flags = bwd_constexprs(cfg, hidden.dtype, has_bias=bias is not None,
                           has_softcap=bool(p.softcap), has_gent=g_ent is not None,
                           has_glse=g_lse is not None, even_h=H % cfg.block_h == 0,
                           need_h=bool(need_hidden), need_w=bool(need_weight), need_b=need_bias,
                           filter=p.filter_eps > 0)
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        for v0 in range(0, V, slab):
            v1 = min(V, v0 + slab)
            if need_weight:
                if w_fp32:
                    dw_slab = dw[v0:v1]
                else:
                    dw_slab = dw_buf[:v1 - v0]
                    dw_slab.zero_()
            else:
                dw_slab = dummy
            grid = (n_blocks * triton.cdiv(v1 - v0, cfg.block_v),)
            launch(_bwd_kernel, grid,
                   hidden, weight, bias if bias is not None else dummy, targets, rows, lse, ent,
                   g_logp, g_ent if g_ent is not None else dummy,
                   g_lse if g_lse is not None else dummy,
                   dh_buf if need_hidden else dummy, dw_slab, db_buf if need_bias else dummy,
                   M, H, hidden.stride(0), weight.stride(0), v0, v1,
                   float(p.temperature), float(p.softcap or 1.0), float(p.filter_eps), **flags,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if need_weight and not w_fp32:
                dw[v0:v1].copy_(dw_slab)
    if need_hidden and not h_fp32:   # cast in row chunks: no second [M, H] temporary
        step = max(1, (4 * 2**20) // (2 * H))
        for s in range(0, M, step):
            dh.index_copy_(0, rows[s:s + step], dh_buf[s:s + step].to(hidden.dtype))
    if need_bias:
        db.copy_(db_buf)
    return dh, dw, db
