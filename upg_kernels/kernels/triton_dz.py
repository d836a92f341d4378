"""The logits gradient of one (token group x vocabulary slab) block, into a bounded workspace.

``dz[i, j] = (gl_i * onehot - gp_i * p_ij - ge_i * p_ij * (log p_ij + H_i)) / T`` (x ``1 - tanh^2`` with
a softcap) for the rows ``rows[0:G]`` (int64 row ids of the active tokens) and the vocabulary columns
``[v_lo, v_hi)``, written in the GEMM operand dtype (bf16/fp16 inputs: their dtype; fp32: fp32) to the
``[G, v_hi - v_lo]`` workspace ``dz`` (row stride ``stride_dz``). The logits are recomputed on chip from
``h`` and ``W`` (``logits_tile``: tensor-core ``tl.dot`` over H, fp32 accumulation) and never stored;
the caller (``gemm_backward``) then runs ``dh += dz @ W_slab`` and ``dW_slab += dz^T @ h_group``.

Grid: one program per ``[BLOCK_N, BLOCK_V]`` tile, grouped ``GROUP_N`` token blocks at a time (the
hidden tiles of a group stay in L2 while the slab's W tiles stream). Each program writes only its own
tile: no atomics, so the result is deterministic.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .meta import launch
from .triton_logprobs_common import (BlockConfig, dot_precision, dz_tile, env_config, interpreting,
                                     logits_tile, upcast_dot)

# the dz tile kernel: like the forward's tile loop (a GEMM with an epilogue), one tile per program
_DZ_GPU = BlockConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3, group_n=8)
_DZ_GPU_F32 = BlockConfig(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=2, group_n=8)
_DZ_INTERP = BlockConfig(block_n=16, block_v=32, block_h=32, num_warps=4, num_stages=1, group_n=2)


def dz_config(dtype: torch.dtype) -> BlockConfig:
    if interpreting():
        return _DZ_INTERP
    return env_config("UPG_KERNELS_TRITON_DZ_CONFIG") or (_DZ_GPU_F32 if dtype == torch.float32 else _DZ_GPU)


@triton.jit
def _dz_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr,
               dz_ptr, G, v_lo, v_hi, H, stride_h, stride_w, stride_dz, temperature, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
               HAS_GLSE: tl.constexpr, EVEN_H: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(G, BLOCK_N)
    v_tiles = tl.cdiv(v_hi - v_lo, BLOCK_V)
    in_group = GROUP_N * v_tiles
    first_n = (pid // in_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % group_size
    pid_v = (pid % in_group) // group_size

    offs_m = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)   # position in the group
    mask_m = offs_m < G
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)          # int64 row ids
    tgt = tl.load(tgt_ptr + rows, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=mask_m, other=0.0)
    ge = gl
    ent = lse
    if HAS_GENT:
        ge = tl.load(ge_ptr + rows, mask=mask_m, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=mask_m, other=0.0)
    gp = gl
    if HAS_GLSE:
        gp = gl - tl.load(gs_ptr + rows, mask=mask_m, other=0.0)
    v0 = v_lo + pid_v.to(tl.int64) * BLOCK_V
    cols = tl.arange(0, BLOCK_V)                                     # int32 inside the tile
    mask_v = cols < v_hi - v0

    z, t = logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_m, v0, cols, mask_v, H, stride_h, stride_w,
                       temperature, softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_H, PREC, UPCAST,
                       BLOCK_N, BLOCK_V, BLOCK_H)
    dz = dz_tile(z, t, cols, tgt, v0, lse, gl, gp, ge, ent, mask_m, mask_v, temperature,
                 HAS_GENT, HAS_SOFTCAP)
    ptrs = dz_ptr + offs_m[:, None] * stride_dz + ((v0 - v_lo) + cols)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_v[None, :])


def dz_block(dz, hidden, weight, bias, targets, rows, lse, ent, g_logp, g_ent, g_lse, v_lo, v_hi, p):
    """Fill ``dz [G, v_hi - v_lo]`` (a view into the workspace, last dim contiguous) for the rows
    ``rows [G]`` and the vocabulary columns ``[v_lo, v_hi)``."""
    G = rows.numel()
    H = hidden.shape[1]
    cfg = dz_config(hidden.dtype)
    dummy = lse
    grid = (triton.cdiv(G, cfg.block_n) * triton.cdiv(v_hi - v_lo, cfg.block_v),)
    dev = hidden.device
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        launch(_dz_kernel, grid,
               hidden, weight, bias if bias is not None else dummy, targets, rows, lse, ent,
               g_logp, g_ent if g_ent is not None else dummy, g_lse if g_lse is not None else dummy,
               dz, G, v_lo, v_hi, H, hidden.stride(0), weight.stride(0), dz.stride(0),
               float(p.temperature), float(p.softcap or 1.0),
               HAS_BIAS=bias is not None, HAS_SOFTCAP=bool(p.softcap), HAS_GENT=g_ent is not None,
               HAS_GLSE=g_lse is not None, EVEN_H=H % cfg.block_h == 0,
               PREC=dot_precision(hidden.dtype), UPCAST=upcast_dot(), BLOCK_N=cfg.block_n,
               BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
