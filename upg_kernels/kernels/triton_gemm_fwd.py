"""The forward path ``"gemm"`` (kernels/backends.py; ``UPG_KERNELS_TRITON_FORWARD=gemm``): cuBLAS logits tiles + a Triton row kernel.

The alternative to the fused forward kernel, for the first GPU run to pick the faster. The non-ignored
rows go in token groups of ``G`` rows and the vocabulary in slabs of ``S`` columns (the sizes come from
the same byte budget as the backward's workspace, ``UPG_KERNELS_WORKSPACE_BYTES``)::

    for each token group g:
        stats = (m=-inf, s=0, t=0, zt=0)                 # float32 [4, G]
        for each vocabulary slab s:
            z = h_g @ W_s^T                              # cuBLAS, float32 output [G, S] (workspace)
            _stats_kernel(z, bias, stats)                # Triton: bias, softcap, 1/T, then the online
                                                         # max / sum-exp / entropy update per row
        lse, entropy, logp of g from stats

``z`` is the only vocabulary-sized buffer and it is bounded (``G x S`` float32). On CUDA the logits
GEMM writes float32 directly (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8); without that
it falls back to logits rounded to the input dtype (named in docs/limitations.md). On the CPU (tests)
the operands are upcast exactly and multiplied in float32. A float32 weight with bf16/fp16 hidden
states (autocast) is cast slab by slab into one ``[S, H]`` buffer (``workspace.WeightSlabs``; ``S`` then
at most ``UPG_KERNELS_CAST_SLAB_BYTES / (2·H)`` columns, the buffer counted in the budget).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .gemm import mm_f32
from .capturable import finish_forward, forward_rows
from .meta import launch
from .workspace import (WeightSlabs, balanced_rows, cast_rows, cast_slab_bytes, group_bounds,
                        keeps_weight, workspace_bytes)
from .triton_logprobs_common import check_inputs, combine, interpreting, online_update, scale_logits_tile

_BLOCK_R, _BLOCK_C = 8, 1024    # rows x columns per step of the row kernel (GPU)
STATS_WARPS = 4
_INTERP_BLOCKS = (4, 32)        # under the interpreter: several steps at test sizes
_SLAB_COLS = 8192
_SLAB_COLS_INTERP = 64


@triton.jit
def _stats_kernel(z_ptr, b_ptr, tgt_ptr, rows_ptr, st_ptr, G, S, v_lo, stride_z, temperature,
                  softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fold the ``[G, S]`` float32 logits slab ``z`` (columns ``v_lo + j``) into the running
    statistics ``st [4, G]`` (m, s, t, zt) of its rows."""
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < G
    rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=mask_r, other=-1)
    m_i = tl.load(st_ptr + offs_r, mask=mask_r, other=float("-inf"))
    s_i = tl.load(st_ptr + G + offs_r, mask=mask_r, other=0.0)
    t_i = tl.load(st_ptr + 2 * G + offs_r, mask=mask_r, other=0.0)
    zt_i = tl.load(st_ptr + 3 * G + offs_r, mask=mask_r, other=0.0)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, S, BLOCK_C):
        mask_c = cols < S - c0
        z = tl.load(z_ptr + offs_r[:, None] * stride_z + (c0 + cols)[None, :],
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        z, _t = scale_logits_tile(z, b_ptr, v_lo + c0, cols, mask_c, temperature, softcap,
                                  HAS_BIAS, HAS_SOFTCAP)
        m_i, s_i, t_i, zt_i = online_update(m_i, s_i, t_i, zt_i, z, cols, mask_c,
                                            tgt - (v_lo + c0))
    tl.store(st_ptr + offs_r, m_i, mask=mask_r)
    tl.store(st_ptr + G + offs_r, s_i, mask=mask_r)
    tl.store(st_ptr + 2 * G + offs_r, t_i, mask=mask_r)
    tl.store(st_ptr + 3 * G + offs_r, zt_i, mask=mask_r)


def plan(M: int, V: int, budget: int, gpu: bool = False, cast=None) -> tuple[int, int]:
    """``(G, S)``: rows per token group and columns per slab of the float32 logits workspace
    (``gpu=True``: the CUDA plan even under the interpreter). ``cast=(H, dtype)``: the weight is cast
    slab by slab into a ``[S, H]`` buffer of ``dtype`` (``S`` within its bound, its bytes within
    ``budget``)."""
    S = min(V, _SLAB_COLS_INTERP if (interpreting() and not gpu) else _SLAB_COLS)
    if cast is not None:
        S = min(S, cast_rows(*cast, align=16))
        budget -= cast_slab_bytes(*cast, S)
    G = max(16, budget // (4 * S) // 16 * 16)
    if G >= M:
        return max(M, 1), S
    return balanced_rows(M, G, 16), S                  # equal groups, no small tail


def forward(hidden, weight, bias, targets, p):
    check_inputs(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    ent = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    targets = targets.contiguous()
    rows, _tg, valid = forward_rows(targets, p)
    M = rows.numel()
    if M == 0:
        return logp, ent, lse
    bias = None if bias is None else bias.contiguous()
    cast = (H, hidden.dtype) if keeps_weight(weight.dtype, hidden.dtype) else None
    G, S = plan(M, V, workspace_bytes(), cast=cast)
    slabs = WeightSlabs(weight, hidden.dtype, rows=S)
    z_buf = torch.empty(min(G, M), min(S, V), dtype=torch.float32, device=dev)
    br, bc = _INTERP_BLOCKS if interpreting() else (_BLOCK_R, _BLOCK_C)
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        for g0, g1 in group_bounds(M, G, 16):
            idx = rows[g0:g1]
            n = g1 - g0
            h_g = hidden[g0:g1] if M == N else hidden.index_select(0, idx)
            stg = torch.zeros(4, n, dtype=torch.float32, device=dev)     # m, s, t, zt
            stg[0].fill_(float("-inf"))
            for v0 in range(0, V, S):
                v1 = min(V, v0 + S)
                z = z_buf[:n, :v1 - v0]
                mm_f32(h_g, slabs(v0, v1).t(), out=z)
                launch(_stats_kernel, (triton.cdiv(n, br),), z, bias if bias is not None else z,
                       targets, idx, stg, n, v1 - v0, v0, z.stride(0), float(p.temperature),
                       float(p.softcap or 1.0), HAS_BIAS=bias is not None,
                       HAS_SOFTCAP=bool(p.softcap), BLOCK_R=br, BLOCK_C=bc, num_warps=STATS_WARPS)
            l, e, zt = combine(stg[:, None, :])   # one "split": the combine of both forward paths
            lse[idx] = l
            ent[idx] = e
            logp[idx] = zt - l
    return finish_forward((logp, ent, lse), valid)


def aot_variants():
    """``_stats_kernel`` as the GPU launches it: no bias, a bf16 / fp16 / fp32 bias, each with and
    without softcap (the full product)."""
    from .aot import KernelVariant, ptr, tail
    out = []
    for bias in (None, torch.bfloat16, torch.float16, torch.float32):
        for cap in (False, True):
            types = dict(z_ptr="*fp32", b_ptr=ptr(bias) if bias else "*fp32", tgt_ptr="*i64",
                         rows_ptr="*i64", st_ptr="*fp32", G="i32", S="i32", v_lo="i32",
                         stride_z="i32", temperature="fp32", softcap="fp32")
            name = " ".join(["bias=" + ptr(bias)[1:] if bias else "no_bias"] + (["softcap"] if cap else []))
            out.append(KernelVariant(
                _stats_kernel, name, types,
                dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=cap, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C),
                STATS_WARPS, 3, divisible=("z_ptr", "b_ptr", "tgt_ptr", "rows_ptr", "st_ptr", "G", "S",
                                           "v_lo", "stride_z")))
    out.append(tail(out[0], "G"))          # a token group whose size is not a multiple of 16
    return out
