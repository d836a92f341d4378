"""The row kernels of the one-pass path (``kernels/one_pass.py``): statistics, then dz in place.

A chunk of ``G`` rows has its float32 logits ``z [G, V]`` (raw ``h @ W^T``, written by cuBLAS) in the
one-pass workspace. Two Triton row kernels read it, around the loss epilogue on ``[G]`` tensors::

    _op_stats_kernel:  one read of z   -> lse, entropy, logp per row           (float32 [3, G])
    (host: the loss's coefficients g_lp, g_H of these rows, O(G))
    _op_dz_kernel:     one read of z   -> dz, written IN PLACE over z's bytes   (the GEMM operand dtype)

Both apply the bias, the softcap and ``1/temperature`` to the raw logits on the fly (the logits are
never rewritten). ``dz`` uses the one formula of the Triton backward (``dz_tile``). With bf16 / fp16
operands dz (2 bytes) goes into the first half of the row's float32 bytes: row ``i``'s dz occupies
bf16 elements ``[2 V i, 2 V i + V)``, i.e. only row ``i``'s own bytes, and within a row the tiles go
left to right, so a tile's store overwrites only logits this program has already loaded; a barrier
between each tile's loads and its store orders the warps of the program (the float32 case stores
element-for-element over what it loaded). Rows whose coefficients are both 0 are written as exact
zeros without reading their logits. Elementwise traffic: 4 (cuBLAS write) + 4 + 4 (two reads)
+ 2 (dz) bytes per logit.

With ``UPG_KERNELS_ONE_PASS_DW=compensated`` a third kernel, ``_op_pair_kernel``, adds each float32
product slab of dW into the pair (bf16 / fp16 gradient ``hi``, bf16 remainder ``lo``).

:class:`RowConfig` holds the launch shape; :func:`aot_variants` registers the kernels for the compile
check. The PyTorch form of the same two steps (the CPU path and the tests' reference) is
``one_pass.TorchRows``.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .meta import launch
from .triton_logprobs_common import dz_tile, interpreting, online_update, scale_logits_tile


@dataclass(frozen=True)
class RowConfig:
    block_r: int      # rows per program
    block_c: int      # columns per step
    num_warps: int
    num_stages: int = 1   # no software pipelining: each tile's loads, then the barrier, then its store


# one row per program (a chunk of ~1-2k rows gives ~10 programs per SM to stream HBM), 2048
# columns a step: 16 float32 values per thread at 4 warps
_ROWS_GPU = RowConfig(block_r=1, block_c=2048, num_warps=4)
_ROWS_INTERP = RowConfig(block_r=2, block_c=32, num_warps=1)   # several rows / steps at test sizes


def row_config(gpu: bool = False) -> RowConfig:
    return _ROWS_INTERP if (interpreting() and not gpu) else _ROWS_GPU


@triton.jit
def _op_stats_kernel(z_ptr, b_ptr, tgt_ptr, st_ptr, G, V, stride_z, temperature, softcap,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows ``[pid*BLOCK_R, ...)`` of the raw float32 logits ``z [G, V]`` (row stride ``stride_z``)
    -> ``st [3, G]``: lse, entropy, logp (``tgt [G]`` the rows' target ids)."""
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < G
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_R,), tl.float32)
    t_i = tl.zeros((BLOCK_R,), tl.float32)
    zt_i = tl.zeros((BLOCK_R,), tl.float32)
    cols = tl.arange(0, BLOCK_C)
    row_ptr = z_ptr + offs_r[:, None] * stride_z
    for c0 in range(0, V, BLOCK_C):
        mask_c = cols < V - c0
        z = tl.load(row_ptr + (c0 + cols)[None, :], mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        z, _t = scale_logits_tile(z, b_ptr, c0, cols, mask_c, temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        m_i, s_i, t_i, zt_i = online_update(m_i, s_i, t_i, zt_i, z, cols, mask_c, tgt - c0)
    log_s = tl.log(s_i)
    lse = m_i + log_s
    tl.store(st_ptr + offs_r, lse, mask=mask_r)
    tl.store(st_ptr + G + offs_r, log_s - t_i / s_i, mask=mask_r)
    tl.store(st_ptr + 2 * G + offs_r, zt_i - lse, mask=mask_r)


@triton.jit
def _op_dz_kernel(z_ptr, dz_ptr, b_ptr, tgt_ptr, st_ptr, gl_ptr, ge_ptr, G, K, V, stride_z,
                  stride_dz, temperature, softcap,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz of rows ``[pid*BLOCK_R, ...) < K`` of the chunk, in place over their logits (see the
    module docstring): ``dz = (gl onehot - gl p - ge p (log p + H)) / T`` (softcap chain rule).
    ``st`` is the stats kernel's output for the chunk's ``G`` rows; ``gl``, ``ge`` ``[G]``."""
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < K
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)
    lse = tl.load(st_ptr + offs_r, mask=mask_r, other=0.0)
    gl = tl.load(gl_ptr + offs_r, mask=mask_r, other=0.0)
    ge = gl
    ent = lse
    act = gl != 0
    if HAS_GENT:
        ge = tl.load(ge_ptr + offs_r, mask=mask_r, other=0.0)
        ent = tl.load(st_ptr + G + offs_r, mask=mask_r, other=0.0)
        act = act | (ge != 0)
    live = mask_r & act                    # zero-coefficient rows: zeros, logits not read
    cols = tl.arange(0, BLOCK_C)
    zrow = z_ptr + offs_r[:, None] * stride_z
    drow = dz_ptr + offs_r[:, None] * stride_dz
    for c0 in range(0, V, BLOCK_C):
        mask_c = cols < V - c0
        z = tl.load(zrow + (c0 + cols)[None, :], mask=live[:, None] & mask_c[None, :], other=0.0)
        z, t = scale_logits_tile(z, b_ptr, c0, cols, mask_c, temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        dz = dz_tile(z, t, cols, tgt, c0, lse, gl, gl, ge, ent, live, mask_c, temperature,
                     HAS_GENT, HAS_SOFTCAP)
        tl.debug_barrier()                 # every warp's loads of this tile precede the store
        tl.store(drow + (c0 + cols)[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=mask_r[:, None] & mask_c[None, :])


class TritonRows:
    """The two steps of a chunk on the GPU (or the interpreter): ``stats`` then ``dz``."""

    def __init__(self, gpu: bool = False):
        self.cfg = row_config(gpu)

    def stats(self, z, bias, tgt, p):
        """``[3, G]`` float32 (lse, entropy, logp) of the raw logits ``z [G, V]``."""
        G, V = z.shape
        st = torch.empty(3, G, dtype=torch.float32, device=z.device)
        c = self.cfg
        with _device(z):
            launch(_op_stats_kernel, (triton.cdiv(G, c.block_r),), z,
                   bias if bias is not None else z, tgt, st, G, V, z.stride(0),
                   float(p.temperature), float(p.softcap or 1.0),
                   **stats_constexprs(c, has_bias=bias is not None, has_softcap=bool(p.softcap)),
                   num_warps=c.num_warps, num_stages=c.num_stages)
        return st

    def dz(self, z, dtype, bias, tgt, st, gl, ge, p, K):
        """``dz [K, V]`` in ``dtype`` of the chunk's first ``K`` rows, written over ``z``'s bytes
        (``z`` a contiguous ``[G, V]`` float32 chunk): for a 2-byte dtype a view with row stride
        ``2V`` into the same storage."""
        G, V = z.shape
        c = self.cfg
        dz = z if dtype == z.dtype else z.view(dtype)[:, :V]
        with _device(z):
            launch(_op_dz_kernel, (triton.cdiv(K, c.block_r),), z, dz,
                   bias if bias is not None else z, tgt, st, gl, ge if ge is not None else gl,
                   G, K, V, z.stride(0), dz.stride(0), float(p.temperature), float(p.softcap or 1.0),
                   **dz_constexprs(c, has_bias=bias is not None, has_softcap=bool(p.softcap),
                                   has_gent=ge is not None),
                   num_warps=c.num_warps, num_stages=c.num_stages)
        return dz[:K]


# the compensated dW update (``UPG_KERNELS_ONE_PASS_DW=compensated``): elementwise over a slab
_PAIR_BLOCK_GPU, _PAIR_BLOCK_INTERP, _PAIR_WARPS = 1024, 64, 4


@triton.jit
def _round_bf16(x):
    """float32 ``x`` rounded to the nearest bf16 (ties to even), as float32: integer arithmetic on
    the bits, so the GPU and the interpreter (whose float32 -> bf16 cast truncates) agree."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _op_pair_kernel(hi_ptr, lo_ptr, p_ptr, n, BLOCK: tl.constexpr):
    """``(hi, lo) += p`` over ``n`` elements: ``s = hi + (lo + p)`` in float32, ``hi = round(s)`` (in
    hi's dtype, to nearest even), ``lo = bf16(s - hi)``. ``hi + lo`` carries ~16 significant bits
    beyond hi's, so the sum over the chunks is as exact as a float32 accumulator's."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    hi = tl.load(hi_ptr + offs, mask=m, other=0.0)
    lo = tl.load(lo_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=m, other=0.0)
    s = hi.to(tl.float32) + (lo + p)
    if hi_ptr.dtype.element_ty == tl.bfloat16:
        h2 = _round_bf16(s)
    else:
        h2 = s.to(hi_ptr.dtype.element_ty).to(tl.float32)
    tl.store(hi_ptr + offs, h2.to(hi_ptr.dtype.element_ty), mask=m)
    tl.store(lo_ptr + offs, _round_bf16(s - h2).to(tl.bfloat16), mask=m)


def pair_block(gpu: bool = False) -> int:
    return _PAIR_BLOCK_INTERP if (interpreting() and not gpu) else _PAIR_BLOCK_GPU


def pair_add_(hi: torch.Tensor, lo: torch.Tensor, p: torch.Tensor) -> None:
    """``(hi, lo) += p`` (contiguous, the same shape; hi bf16/fp16, lo bf16, p float32), by
    :func:`_op_pair_kernel`. The PyTorch form is ``one_pass.pair_add_torch_``."""
    n = hi.numel()
    blk = pair_block()
    with _device(hi):
        launch(_op_pair_kernel, (triton.cdiv(n, blk),), hi, lo, p, n, BLOCK=blk, num_warps=_PAIR_WARPS)


def _device(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def stats_constexprs(cfg: RowConfig, *, has_bias, has_softcap) -> dict:
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c)


def dz_constexprs(cfg: RowConfig, *, has_bias, has_softcap, has_gent) -> dict:
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, HAS_GENT=has_gent,
                BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c)


def aot_variants():
    """The row kernels as the GPU launches them (``row_config(gpu=True)``): the stats kernel for the full
    product bias (none, bf16, fp16, fp32) x softcap (8); the dz kernel for dz in bf16 / fp16 / fp32
    (the operand dtype, also the bias's) x bias x softcap x entropy gradient (24). ``G``, ``K``, ``V``
    get no divisibility specialization (any vocabulary); pointers and the row strides (``V``, and
    ``2V`` for a 2-byte dz) are declared multiples of 16, as at real vocabularies (V = 128256). The
    compensated dW update for bf16 / fp16 gradients (2; ``n`` = slab rows x H, a multiple of 16)."""
    from .aot import DTYPE_NAMES, GPU_DTYPES, KernelVariant, ptr
    cfg = row_config(gpu=True)
    out = []
    for cap in (False, True):
        for bias in (None,) + GPU_DTYPES:
            types = dict(z_ptr="*fp32", b_ptr=ptr(bias) if bias else "*fp32", tgt_ptr="*i64",
                         st_ptr="*fp32", G="i32", V="i32", stride_z="i32", temperature="fp32",
                         softcap="fp32")
            name = " ".join(["bias=" + DTYPE_NAMES[bias] if bias else "no_bias"] + (["softcap"] if cap else []))
            out.append(KernelVariant(
                _op_stats_kernel, name, types,
                stats_constexprs(cfg, has_bias=bias is not None, has_softcap=cap), cfg.num_warps, cfg.num_stages,
                divisible=("z_ptr", "b_ptr", "tgt_ptr", "st_ptr", "stride_z")))
    for dt in GPU_DTYPES:
        for bias in (False, True):
            for cap in (False, True):
                for gent in (False, True):
                    types = dict(z_ptr="*fp32", dz_ptr=ptr(dt), b_ptr=ptr(dt) if bias else "*fp32",
                                 tgt_ptr="*i64", st_ptr="*fp32", gl_ptr="*fp32", ge_ptr="*fp32",
                                 G="i32", K="i32", V="i32", stride_z="i32", stride_dz="i32",
                                 temperature="fp32", softcap="fp32")
                    name = " ".join([DTYPE_NAMES[dt]] + [f for f, on in (("bias", bias), ("softcap", cap),
                                                                          ("gent", gent)) if on])
                    out.append(KernelVariant(
                        _op_dz_kernel, name, types,
                        dz_constexprs(cfg, has_bias=bias, has_softcap=cap, has_gent=gent),
                        cfg.num_warps, cfg.num_stages,
                        divisible=("z_ptr", "dz_ptr", "b_ptr", "tgt_ptr", "st_ptr", "gl_ptr",
                                   "ge_ptr", "stride_z", "stride_dz")))
    for dt in (torch.bfloat16, torch.float16):
        out.append(KernelVariant(
            _op_pair_kernel, f"pair {DTYPE_NAMES[dt]}",
            dict(hi_ptr=ptr(dt), lo_ptr="*bf16", p_ptr="*fp32", n="i32"),
            dict(BLOCK=pair_block(gpu=True)), _PAIR_WARPS, 1,
            divisible=("hi_ptr", "lo_ptr", "p_ptr", "n")))
    return out
