"""Forward: per-token log-sum-exp, entropy and target log-prob without vocab-sized logits.

Grid: (token blocks of BLOCK_N over the non-ignored rows) x (vocabulary splits), one program each,
flattened to 1-D with the split index fastest (so the programs resident at one time share few
token blocks: their hidden tiles stay in L2). A program loops over its vocabulary range in BLOCK_V
tiles, computes each logits tile with ``tl.dot`` over BLOCK_H chunks of H (fp32 accumulation) and
folds it into four running per-row statistics, relative to the running max ``m``:

    s = sum_j exp(z_j - m)        t = sum_j exp(z_j - m) * (z_j - m)        zt = z[target]

It writes them as partials ``[4, splits, M]``; the combine (a few torch ops on that small tensor)
(``triton_logprobs_common.combine``) rescales to the global max and gives ``lse = m + log s``, ``entropy = log s - t / s``,
``logp = zt - lse``. Nothing of size N x V (or tokens x V) is ever written to memory.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .aot import (DTYPE_NAMES, EVEN_H_EXAMPLE, GPU_DTYPES, ODD_H_EXAMPLE, KernelVariant, fp32_weight,
                  label, ptr, tail)
from .capturable import finish_forward, forward_rows
from .meta import launch
from .triton_logprobs_common import (check_inputs, combine, dot_precision, fwd_config, interpreting,
                                     logits_tile, num_sms, online_update, upcast_dot)


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, part_ptr,
                M, V, H, stride_h, stride_w, n_splits, v_per_split, temperature, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_H: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = pid % n_splits
    pid_n = pid // n_splits

    offs_m = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)          # int64 row ids
    tgt = tl.load(tgt_ptr + rows, mask=mask_m, other=-1)

    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_N,), tl.float32)
    t_i = tl.zeros((BLOCK_N,), tl.float32)
    zt_i = tl.zeros((BLOCK_N,), tl.float32)

    v_start = pid_s.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    cols = tl.arange(0, BLOCK_V)                          # int32 inside the tile
    for v0 in range(v_start, v_end, BLOCK_V):
        mask_v = cols < v_end - v0
        z, _t = logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_m, v0, cols, mask_v, H, stride_h,
                            stride_w, temperature, softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_H, PREC,
                            UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        m_i, s_i, t_i, zt_i = online_update(m_i, s_i, t_i, zt_i, z, cols, mask_v, tgt - v0)

    base = part_ptr + pid_s.to(tl.int64) * M + offs_m
    stride_j = (tl.full((), 0, tl.int64) + n_splits) * M   # int64 even if n_splits is specialized
    tl.store(base, m_i, mask=mask_m)
    tl.store(base + stride_j, s_i, mask=mask_m)
    tl.store(base + 2 * stride_j, t_i, mask=mask_m)
    tl.store(base + 3 * stride_j, zt_i, mask=mask_m)


def _num_splits(n_blocks: int, v_tiles: int, sms: int) -> int:
    """Vocabulary splits: fill the GPU with whole waves of programs; keep each split >= 4 tiles.

    Among splits that give at least one wave of ``sms`` programs (when the vocabulary allows),
    take the best wave efficiency (programs / (waves * sms)); ties go to the split count nearest
    8, which groups the resident programs on few token blocks (L2 reuse of the hidden tiles).
    Under the interpreter: 2 splits (cheap, and exercises the combine)."""
    if interpreting():
        return max(1, min(v_tiles, 2))
    max_s = max(1, v_tiles // 4)
    lo = min(max_s, triton.cdiv(sms, n_blocks))
    hi = min(max_s, max(lo, 16))
    best, best_key = lo, None
    for s in range(lo, hi + 1):
        p = n_blocks * s
        eff = p / (triton.cdiv(p, sms) * sms)
        key = (round(eff, 2), -abs(s - 8))
        if best_key is None or key > best_key:
            best, best_key = s, key
    return best


def fwd_constexprs(cfg, dtype, *, has_bias: bool, has_softcap: bool, even_h: bool) -> dict:
    """The constexpr arguments of ``_fwd_kernel`` for a launch (the launcher and
    :func:`aot_variants` both call this)."""
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, EVEN_H=even_h,
                PREC=dot_precision(dtype), UPCAST=upcast_dot(), BLOCK_N=cfg.block_n,
                BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h)


POINTERS = ("h_ptr", "w_ptr", "b_ptr", "tgt_ptr", "rows_ptr", "part_ptr")


# integers that the launches at real shapes make multiples of 16 (the JIT specializes on them):
# the row count M (a "tail" variant covers other M), V (all yardstick vocabularies), v_per_split
# (a multiple of BLOCK_V); H and the strides for even H
REAL_DIVISIBLE = ("M", "V", "v_per_split")


def aot_variants() -> list[KernelVariant]:
    """What ``forward_partials`` can launch: bias x softcap x even H, the full product for bf16 and
    fp32 (8 each); fp16 (the bf16 code with another element type) with all flags off and all on;
    and for each dtype the flags-off case with M not a multiple of 16 (``tail``); autocast's bf16
    hidden states with a float32 weight (``aot.fp32_weight``), flags off and bias + softcap. The block
    config is ``fwd_config(dtype, H, bias and softcap)``'s GPU one; integers specialized as at real
    shapes."""
    out = []
    for dt in GPU_DTYPES:
        types = dict(h_ptr=ptr(dt), w_ptr=ptr(dt), b_ptr=ptr(dt), tgt_ptr="*i64", rows_ptr="*i64",
                     part_ptr="*fp32", M="i32", V="i32", H="i32", stride_h="i32", stride_w="i32",
                     n_splits="i32", v_per_split="i32", temperature="fp32", softcap="fp32")
        for bias in (False, True):
            for cap in (False, True):
                for even in (True, False):
                    cfg = fwd_config(dt, EVEN_H_EXAMPLE if even else ODD_H_EXAMPLE, bias and cap)
                    flags = dict(has_bias=bias, has_softcap=cap, even_h=even)
                    if dt == torch.float16 and len({bias, cap, not even}) > 1:
                        continue          # fp16: all off / all on only
                    out.append(KernelVariant(
                        _fwd_kernel, label({"bias": bias, "softcap": cap, "odd_h": not even},
                                           DTYPE_NAMES[dt]),
                        types, fwd_constexprs(cfg, dt, **flags), cfg.num_warps, cfg.num_stages,
                        divisible=POINTERS + REAL_DIVISIBLE
                        + (("H", "stride_h", "stride_w") if even else ())))
        out.append(tail(out[-8 if dt != torch.float16 else -2], "M"))   # flags off, M % 16 != 0
    return out + [fp32_weight(v) for v in out if v.variant in ("bf16", "bf16 bias softcap")]


def forward_partials(hidden, weight, bias, targets, p):
    """Launch the forward kernel. Returns ``(part, rows)``: the ``[4, splits, M]`` float32
    partials of the ``M`` non-ignored rows and their int64 row ids ``rows [M]``; ``part`` is None
    when every row is ignored. ``forward`` combines them with torch ops; the fused loss epilogue
    (``triton_epilogue``) combines them in registers."""
    check_inputs(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    bias = None if bias is None else bias.contiguous()
    targets = targets.contiguous()
    rows, targets, _valid = forward_rows(targets, p)
    M = rows.numel()
    if M == 0:
        return None, rows
    cfg = fwd_config(hidden.dtype, H, bias is not None and bool(p.softcap))
    n_blocks = triton.cdiv(M, cfg.block_n)
    v_tiles = triton.cdiv(V, cfg.block_v)
    splits = _num_splits(n_blocks, v_tiles, num_sms(dev))
    v_per_split = triton.cdiv(v_tiles, splits) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)                  # no empty split
    part = torch.empty(4, splits, M, dtype=torch.float32, device=dev)
    flags = fwd_constexprs(cfg, hidden.dtype, has_bias=bias is not None,
                           has_softcap=bool(p.softcap), even_h=H % cfg.block_h == 0)
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        launch(_fwd_kernel, (n_blocks * splits,),
               hidden, weight, bias if bias is not None else hidden, targets, rows, part,
               M, V, H, hidden.stride(0), weight.stride(0), splits, v_per_split,
               float(p.temperature), float(p.softcap or 1.0), **flags,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return part, rows


def forward(hidden, weight, bias, targets, p):
    """The forward path ``"fused"`` (kernels/backends.py): the kernel's partials, combined by
    ``combine``."""
    N = hidden.shape[0]
    dev = hidden.device
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    ent = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    part, rows = forward_partials(hidden, weight, bias, targets, p)
    if part is None:
        return logp, ent, lse
    l, e, zt = combine(part)
    if getattr(p, "capturable", False):   # every row ran (rows = arange): no scatter
        return finish_forward((zt - l, e, l), targets != p.ignore_index)
    lse[rows] = l
    ent[rows] = e
    logp[rows] = zt - l
    return logp, ent, lse
