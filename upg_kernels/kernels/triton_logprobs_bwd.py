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

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import active_rows
from .triton_logprobs_common import (bwd_config, check_inputs, dot, dot_precision, dz_tile,
                                     logits_tile, num_sms, upcast_dot)

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
    # grouped order: GROUP_N token blocks x all vocabulary tiles of the slab, token block fastest
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(M, BLOCK_N)
    v_tiles = tl.cdiv(v_hi - v_lo, BLOCK_V)
    in_group = GROUP_N * v_tiles
    first_n = (pid // in_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % group_size
    pid_v = (pid % in_group) // group_size

    offs_m = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)          # int64 row ids
    tgt = tl.load(tgt_ptr + rows, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=mask_m, other=0.0)
    v0 = v_lo + pid_v.to(tl.int64) * BLOCK_V
    cols = tl.arange(0, BLOCK_V)                          # int32 inside the tile
    mask_v = cols < v_hi - v0

    z, t = logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_m, v0, cols, mask_v, H, stride_h, stride_w,
                       temperature, softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_H, PREC, UPCAST,
                       BLOCK_N, BLOCK_V, BLOCK_H)
    ge = gl
    ent = lse
    if HAS_GENT:
        ge = tl.load(ge_ptr + rows, mask=mask_m, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=mask_m, other=0.0)
    gp = gl
    if HAS_GLSE:
        gp = gl - tl.load(gs_ptr + rows, mask=mask_m, other=0.0)
    dz = dz_tile(z, t, cols, tgt, v0, lse, gl, gp, ge, ent, mask_m, mask_v, temperature,
                 HAS_GENT, HAS_SOFTCAP)

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
                    w = tl.load(w_ptrs, mask=mask_v[:, None], other=0.0)
                    tl.atomic_add(dh_ptrs, dot(dzc, w, None, PREC, UPCAST),
                                  mask=mask_m[:, None], sem="relaxed")
                else:
                    kmask = offs_k + k < H
                    w = tl.load(w_ptrs, mask=mask_v[:, None] & kmask[None, :], other=0.0)
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
    budget = int(os.environ.get("UPG_KERNELS_TRITON_DW_SLAB_BYTES", DW_SLAB_BYTES))
    row_bytes = 4 * max(H, 1)
    rows = max(block_v, (budget // row_bytes) // block_v * block_v)
    fill = triton.cdiv(2 * sms, n_blocks) * block_v
    if fill > rows and "UPG_KERNELS_TRITON_DW_SLAB_BYTES" not in os.environ:
        rows = max(rows, min(fill, (4 * budget // row_bytes) // block_v * block_v))
    return min(rows, triton.cdiv(V, block_v) * block_v)


def backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
             need_hidden=True, need_weight=True, need_bias=True, g_lse=None):
    check_inputs(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_bias = bool(need_bias) and bias is not None
    dh = torch.zeros(N, H, dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = torch.zeros(V, H, dtype=weight.dtype, device=dev) if need_weight else None
    db = torch.zeros(V, dtype=bias.dtype, device=dev) if need_bias else None
    bias = None if bias is None else bias.contiguous()
    targets = targets.contiguous()
    if not (need_hidden or need_weight or need_bias):
        return dh, dw, db

    rows, g_logp, g_ent, g_lse = active_rows(targets, g_logp, g_ent, g_lse, p.ignore_index)
    M = rows.numel()
    if M == 0:
        return dh, dw, db

    cfg = bwd_config(hidden.dtype)
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
            _bwd_kernel[grid](
                hidden, weight, bias if bias is not None else dummy, targets, rows, lse, ent,
                g_logp, g_ent if g_ent is not None else dummy, g_lse if g_lse is not None else dummy,
                dh_buf if need_hidden else dummy, dw_slab, db_buf if need_bias else dummy,
                M, H, hidden.stride(0), weight.stride(0), v0, v1,
                float(p.temperature), float(p.softcap or 1.0), float(p.filter_eps),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=bool(p.softcap),
                HAS_GENT=g_ent is not None, HAS_GLSE=g_lse is not None, EVEN_H=H % cfg.block_h == 0,
                PREC=dot_precision(hidden.dtype), UPCAST=upcast_dot(), DH_DIRECT=h_fp32,
                NEED_H=bool(need_hidden), NEED_W=bool(need_weight), NEED_B=need_bias,
                FILTER=p.filter_eps > 0,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                GROUP_N=cfg.group_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if need_weight and not w_fp32:
                dw[v0:v1].copy_(dw_slab)
    if need_hidden and not h_fp32:   # cast in row chunks: no second [M, H] temporary
        step = max(1, (4 * 2**20) // (2 * H))
        for s in range(0, M, step):
            dh.index_copy_(0, rows[s:s + step], dh_buf[s:s + step].to(hidden.dtype))
    if need_bias:
        db.copy_(db_buf)
    return dh, dw, db
