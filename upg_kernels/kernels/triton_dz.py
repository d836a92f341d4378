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

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

from .meta import launch
from ..settings import TRITON_DZ_CONFIG
from .triton_logprobs_common import (BlockConfig, dot_precision, env_config, grad_tile, interpreting,
                                     upcast_dot)

# the dz tile kernel: like the forward's tile loop (a GEMM with an epilogue), one tile per program.
# Two bf16/fp16 tiles, both selectable (``UPG_KERNELS_TRITON_DZ_CONFIG=128x128`` / ``128x64``, or
# "BN,BV,BH,warps,stages[,group]"); DZ_TILES[DZ_DEFAULT] is the default. Which one is spill-free is
# decided by the compile check built as the JIT builds it (G, v_lo, v_hi, H and the strides
# specialized as multiples of 16; docs/kernels.md "Block sizes"): 128x128 issues m64n128 wgmma on
# sm_90 (one CTA per SM), 128x64 m64n64 with fewer registers (two CTAs per SM).
DZ_TILES = {
    "128x128": BlockConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3, group_n=8),
    "128x64": BlockConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3, group_n=8),
}
DZ_DEFAULT = "128x128"
_DZ_GPU_F32 = BlockConfig(block_n=128, block_v=64, block_h=16, num_warps=8, num_stages=2, group_n=8)
_DZ_INTERP = BlockConfig(block_n=16, block_v=32, block_h=32, num_warps=4, num_stages=1, group_n=2)


# H not a multiple of 64 (masked H chunks): half the H chunk (spill-free in the compile check)
_DZ_GPU_ODD_H = BlockConfig(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3, group_n=8)


# the tile the path selection chose for the call being run (kernels/select.py; the backend string
# carries it to the backward op, which runs the backward inside :func:`dz_tile_scope`)
_SCOPED_TILE: ContextVar[str | None] = ContextVar("upg_kernels_dz_tile", default=None)


@contextmanager
def dz_tile_scope(name: str | None):
    """Within the block, :func:`dz_config` uses the tile ``name`` of :data:`DZ_TILES` (None: the
    default) where no ``UPG_KERNELS_TRITON_DZ_CONFIG`` pins one."""
    if name is not None and name not in DZ_TILES:
        raise ValueError(f"dz tile must be None or one of {sorted(DZ_TILES)}, got {name!r}")
    token = _SCOPED_TILE.set(name)
    try:
        yield
    finally:
        _SCOPED_TILE.reset(token)


def scoped_tile() -> str | None:
    """The tile of the enclosing :func:`dz_tile_scope` (None outside one)."""
    return _SCOPED_TILE.get()


def dz_tile_setting() -> tuple[str | None, BlockConfig | None]:
    """``UPG_KERNELS_TRITON_DZ_CONFIG`` (upg_kernels/settings.py): ``(name, None)`` for a name of
    :data:`DZ_TILES` (the bf16/fp16 tile at even H), ``(None, config)`` for
    "BN,BV,BH,warps,stages[,group]" (every launch), ``(None, None)`` when unset."""
    raw = TRITON_DZ_CONFIG.raw()
    if raw in DZ_TILES:
        return raw, None
    try:
        return None, env_config(TRITON_DZ_CONFIG)
    except ValueError:
        raise ValueError(f"{TRITON_DZ_CONFIG.name} must be one of {sorted(DZ_TILES)} or "
                         f"'BN,BV,BH,warps,stages[,group]', got {raw!r}") from None


def dz_config(dtype: torch.dtype, H: int | None = None, gpu: bool = False) -> BlockConfig:
    """The dz kernel's blocks for ``dtype`` and hidden size ``H`` (None: a multiple of 64;
    ``gpu=True``: the CUDA config even under the interpreter). The bf16/fp16 tile at even H:
    ``UPG_KERNELS_TRITON_DZ_CONFIG`` (a pin), else the tile of the enclosing :func:`dz_tile_scope`
    (the path selection's choice), else :data:`DZ_DEFAULT`."""
    if interpreting() and not gpu:
        return _DZ_INTERP
    name, env = dz_tile_setting()
    if env:
        return env
    if dtype == torch.float32:
        return _DZ_GPU_F32                      # BLOCK_H 16: spill-free for odd H as well
    return _DZ_GPU_ODD_H if H is not None and H % 64 else DZ_TILES[name or scoped_tile() or DZ_DEFAULT]


def tile_applies(dtype: torch.dtype, H: int) -> bool:
    """Whether the tile of :data:`DZ_TILES` decides the dz launch of a call (bf16/fp16, H a multiple
    of 64, no ``UPG_KERNELS_TRITON_DZ_CONFIG`` pin): the path selection times the tiles only then."""
    return dtype in (torch.bfloat16, torch.float16) and H % 64 == 0 and not TRITON_DZ_CONFIG.is_set()


def dz_constexprs(cfg, dtype, *, has_bias, has_softcap, has_gent, has_glse, even_h) -> dict:
    """The constexpr arguments of ``_dz_kernel`` (the launcher and :func:`aot_variants`)."""
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, HAS_GENT=has_gent, HAS_GLSE=has_glse,
                EVEN_H=even_h, PREC=dot_precision(dtype), UPCAST=upcast_dot(), BLOCK_N=cfg.block_n,
                BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n)


@triton.jit
def _dz_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr,
               dz_ptr, G, v_lo, v_hi, H, stride_h, stride_w, stride_dz, temperature, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
               HAS_GLSE: tl.constexpr, EVEN_H: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
    dz, offs_m, mask_m, _rows, v0, cols, mask_v, _gl, _gp, _ge = grad_tile(
        tl.program_id(0), G, v_lo, v_hi, h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr,
        gl_ptr, ge_ptr, gs_ptr, H, stride_h, stride_w, temperature, softcap, HAS_BIAS, HAS_SOFTCAP,
        HAS_GENT, HAS_GLSE, EVEN_H, PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N)
    ptrs = dz_ptr + offs_m[:, None] * stride_dz + ((v0 - v_lo) + cols)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_v[None, :])


def dz_block(dz, hidden, weight, bias, targets, rows, lse, ent, g_logp, g_ent, g_lse, v_lo, v_hi, p):
    """Fill ``dz [G, v_hi - v_lo]`` (a view into the workspace, last dim contiguous) for the rows
    ``rows [G]`` and the vocabulary columns ``[v_lo, v_hi)``."""
    G = rows.numel()
    H = hidden.shape[1]
    cfg = dz_config(hidden.dtype, H)
    dummy = lse
    grid = (triton.cdiv(G, cfg.block_n) * triton.cdiv(v_hi - v_lo, cfg.block_v),)
    dev = hidden.device
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        launch(_dz_kernel, grid,
               hidden, weight, bias if bias is not None else dummy, targets, rows, lse, ent,
               g_logp, g_ent if g_ent is not None else dummy, g_lse if g_lse is not None else dummy,
               dz, G, v_lo, v_hi, H, hidden.stride(0), weight.stride(0), dz.stride(0),
               float(p.temperature), float(p.softcap or 1.0),
               **dz_constexprs(cfg, hidden.dtype, has_bias=bias is not None,
                               has_softcap=bool(p.softcap), has_gent=g_ent is not None,
                               has_glse=g_lse is not None, even_h=H % cfg.block_h == 0),
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def aot_variants():
    """For bf16 and fp32: all flags off (the GRPO/SFT case), each of bias / softcap / entropy
    gradient / lse gradient / odd H alone, all on; fp16: all off and all on (``aot.flag_cover``);
    ``dz_config(dtype, H)``'s GPU block config. Integers as the plans launch them: G (a group of the
    balanced plan), v_lo, v_hi (slab bounds, V of every yardstick model), H and the strides multiples of
    16; for each dtype the flags-off case with G not a multiple of 16 (``tail``: the last group of an
    odd row count). The other bf16 tile of :data:`DZ_TILES` too (flags off, its tail, all on), so
    that either setting is checked. Autocast's bf16 hidden states with a float32 weight
    (``aot.fp32_weight``): flags off and all on."""
    from .aot import (DTYPE_NAMES, EVEN_H_EXAMPLE, GPU_DTYPES, ODD_H_EXAMPLE, KernelVariant,
                      flag_cover, fp32_weight, label, ptr, tail)
    base = dict(bias=False, softcap=False, gent=False, glse=False, odd_h=False)
    cover = flag_cover({k: (False, True) for k in base}, base)

    def variant(dt, c, cfg, prefix):
        types = dict(h_ptr=ptr(dt), w_ptr=ptr(dt), b_ptr=ptr(dt) if c["bias"] else "*fp32",
                     tgt_ptr="*i64", rows_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32",
                     gl_ptr="*fp32", ge_ptr="*fp32", gs_ptr="*fp32", dz_ptr=ptr(dt), G="i32",
                     v_lo="i32", v_hi="i32", H="i32", stride_h="i32", stride_w="i32",
                     stride_dz="i32", temperature="fp32", softcap="fp32")
        cx = dz_constexprs(cfg, dt, has_bias=c["bias"], has_softcap=c["softcap"],
                           has_gent=c["gent"], has_glse=c["glse"], even_h=not c["odd_h"])
        div = tuple(a for a in types if a.endswith("_ptr")) + ("G", "v_lo", "v_hi", "stride_dz") + (
            () if c["odd_h"] else ("H", "stride_h", "stride_w"))
        return KernelVariant(_dz_kernel, label(c, prefix), types, cx, cfg.num_warps, cfg.num_stages,
                             divisible=div)

    out = []
    for dt in GPU_DTYPES:
        for c in (cover if dt != torch.float16 else (cover[0], cover[-1])):
            cfg = dz_config(dt, ODD_H_EXAMPLE if c["odd_h"] else EVEN_H_EXAMPLE)
            out.append(variant(dt, c, cfg, DTYPE_NAMES[dt]))
            if dt == torch.bfloat16 and c in (base, cover[-1]):
                out.append(fp32_weight(out[-1]))
            if c == base:
                out.append(tail(out[-2 if dt == torch.bfloat16 else -1], "G"))
    default = dz_config(torch.bfloat16, EVEN_H_EXAMPLE)
    for name, cfg in DZ_TILES.items():
        if cfg != default:
            v = variant(torch.bfloat16, base, cfg, f"bf16 tile={name}")
            all_on = {**cover[-1], "odd_h": False}     # odd H keeps its own config
            out += [v, tail(v, "G"), variant(torch.bfloat16, all_on, cfg, f"bf16 tile={name}")]
    return out
