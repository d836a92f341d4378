"""Shared pieces of the Triton log-prob kernels: block configs, input checks, the logits tile, the
combine of the forward's split partials.

See docs/kernels.md for the design. Everything here is used by ``triton_logprobs_fwd`` and
``triton_logprobs_bwd``; ``triton_logprobs`` re-exports the two host functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..settings import TRITON_BWD_CONFIG, TRITON_FWD_CONFIG
from ..settings import interpreter_on as interpreting   # one definition of "under the interpreter"
from .workspace import keeps_weight

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BlockConfig:
    block_n: int      # tokens per tile
    block_v: int      # vocabulary entries per tile
    block_h: int      # hidden-dimension chunk of each tl.dot
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8  # backward: token blocks per L2 group of the tile swizzle


# H100 defaults (see docs/kernels.md "Block sizes"); register use and spills are checked for sm_80
# and sm_90 with triton 3.6 and 3.9 by ``python -m upg_kernels.aot_check`` (0 bytes of spills);
# small blocks under the CPU interpreter so the tests stay fast and still cover several token
# blocks, vocabulary tiles and H chunks.
_FWD_GPU = BlockConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
_BWD_GPU = BlockConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
# float32 inputs run their products as 3xTF32 (two extra MMAs per step): smaller tiles fit
# (BLOCK_H 32 spilled 100s of bytes on sm_80 in the compile check; 16 spills nothing)
_FWD_GPU_F32 = BlockConfig(block_n=128, block_v=64, block_h=16, num_warps=8, num_stages=2)
_BWD_GPU_F32 = BlockConfig(block_n=128, block_v=64, block_h=16, num_warps=8, num_stages=2)
# H not a multiple of BLOCK_H: the masked H chunks need more registers (about 1 KB of spills at
# the configs above); half the vocabulary tile and the H chunk fit
_FWD_GPU_ODD_H = BlockConfig(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3)
_BWD_GPU_ODD_H = BlockConfig(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3)
_BWD_GPU_F32_ODD_H = BlockConfig(block_n=128, block_v=32, block_h=16, num_warps=8, num_stages=2)
# bf16/fp16 forward with a bias AND a softcap: 128x128 spilled 60-88 bytes on sm_80 with triton 3.9
_FWD_GPU_BIAS_SOFTCAP = BlockConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3)
# bf16/fp16 atomic backward with a softcap: the tanh chain factor is one more [128, 128] float32
# tile; 128x128 spilled 96-116 bytes on sm_80 with triton 3.9 (compile check); 128x64 fits. Also
# the tile of a float32 weight cast in registers (autocast)
_BWD_GPU_SOFTCAP = BlockConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3)
_FWD_INTERP = BlockConfig(block_n=16, block_v=64, block_h=32, num_warps=4, num_stages=1)
_BWD_INTERP = BlockConfig(block_n=16, block_v=64, block_h=32, num_warps=4, num_stages=1, group_n=2)


def env_config(setting):
    """The block config of ``setting`` (``UPG_KERNELS_TRITON_FWD_CONFIG`` / ``_BWD_CONFIG`` /
    ``_DZ_CONFIG`` = "BN,BV,BH,warps,stages[,group]", see upg_kernels/settings.py), None when unset:
    it overrides the defaults (for tuning on a new GPU; see ``triton_logprobs_tune``)."""
    v = setting.get()
    return BlockConfig(*v) if v else None


def _pick(dtype, H, default, odd_h, f32, f32_odd_h) -> BlockConfig:
    """The config for ``dtype``; its "odd H" variant when ``H`` is not a multiple of its BLOCK_H."""
    cfg, odd = (f32, f32_odd_h) if dtype == torch.float32 else (default, odd_h)
    return odd if H is not None and H % cfg.block_h else cfg


def fwd_config(dtype: torch.dtype, H: int | None = None, bias_softcap: bool = False) -> BlockConfig:
    """The forward's block config for ``dtype`` and hidden size ``H`` (None: a multiple of 64);
    ``bias_softcap``: the launch has both a bias and a softcap."""
    if interpreting():
        return _FWD_INTERP
    default = _FWD_GPU_BIAS_SOFTCAP if bias_softcap else _FWD_GPU
    return (env_config(TRITON_FWD_CONFIG)
            or _pick(dtype, H, default, _FWD_GPU_ODD_H, _FWD_GPU_F32, _FWD_GPU_F32))


def bwd_config(dtype: torch.dtype, H: int | None = None, softcap: bool = False,
               cast_weight: bool = False) -> BlockConfig:
    """The backward's block config for ``dtype`` and hidden size ``H`` (None: a multiple of 64),
    with or without a softcap; ``cast_weight``: a float32 weight whose tiles the kernel casts to
    bf16/fp16 (autocast; at 128x128 its float32 tiles spilled 72 bytes on sm_80 with triton 3.6)."""
    if interpreting():
        return _BWD_INTERP
    default = _BWD_GPU_SOFTCAP if (softcap or cast_weight) else _BWD_GPU
    return (env_config(TRITON_BWD_CONFIG)
            or _pick(dtype, H, default, _BWD_GPU_ODD_H, _BWD_GPU_F32, _BWD_GPU_F32_ODD_H))


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias) -> None:
    """Triton-specific checks (the public API has validated shapes, devices and ranges)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 {name}, got "
                            f"{t.dtype}; use backend='torch' for float64")
    if hidden.dtype != weight.dtype and not keeps_weight(weight.dtype, hidden.dtype):
        raise TypeError(f"backend='triton' needs hidden and weight in one dtype, or a float32 weight "
                        f"with bf16/fp16 hidden states (autocast), got {hidden.dtype} and {weight.dtype}")
    if hidden.device.type not in ("cuda", "meta") and not interpreting():   # meta: kernels/meta.py
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                         f"got tensors on {hidden.device}")
    if hidden.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("backend='triton' needs hidden and weight with a contiguous last "
                         "dimension")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: never plain TF32 (~1e-3 relative error). On the GPU 3xTF32 (tensor cores,
    about float32 accuracy); under the interpreter exact float32 products. bf16/fp16 inputs use
    the tensor cores natively and ignore this setting."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if interpreting() else "tf32x3"


META_SMS = 132   # the meta device (memory model) plans grids for an H100 SXM


def combine(part: torch.Tensor):
    """``[4, splits, M]`` partials (m, s, t, zt per split, see ``online_update``) -> ``(lse, entropy,
    target logit)`` ``[M]`` float32: each split rescaled to the global max, summed in split order.
    Both Triton forward paths finish with it; the fused loss epilogue does the same in registers."""
    m, s, t, zt = part.unbind(0)
    mx = m.max(0).values
    alpha = torch.exp(m - mx)
    s_tot = (alpha * s).sum(0)
    t_tot = (alpha * (t + torch.where(s > 0, (m - mx) * s, 0.0))).sum(0)   # splits with s = 0: m = -inf
    log_s = torch.log(s_tot)
    return mx + log_s, log_s - t_tot / s_tot, zt.sum(0)


def num_sms(device: torch.device) -> int:
    if device.type == "meta":
        return META_SMS
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def tanh(x):
    # tanh without libdevice (the interpreter has none): sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


def upcast_dot() -> bool:
    """The CPU interpreter (triton 3.9) mis-computes tl.dot on bfloat16 operands (numpy has no
    bf16): there the kernels upcast the (already bf16-rounded) operands to float32 first."""
    return interpreting()


@triton.jit
def operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded W tile ``x`` in the operand dtype ``dtype`` (hidden's): nothing for one dtype; a
    float32 tile with bf16/fp16 hidden states (autocast) is rounded to nearest even in registers, as
    ``weight.to(dtype)`` would. Under the interpreter (``UPCAST``), whose float32 -> bf16 cast
    truncates, the bf16 rounding is done on the bits and the tile stays float32 (``dot`` upcasts)."""
    if UPCAST and dtype == tl.bfloat16 and x.dtype == tl.float32:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_m, v0, cols, mask_v, H, stride_h, stride_w,
                temperature, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_H: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``z = softcap(h[rows] @ w[v0 + cols].T + b[v0 + cols]) / temperature`` as a float32
    [BLOCK_N, BLOCK_V] tile, and ``t = tanh(. / softcap)`` (for the backward chain rule; the
    logits themselves when there is no softcap). ``rows`` are int64 row ids, ``v0`` an int64
    scalar, ``cols`` int32 ``arange(BLOCK_V)`` (int32 inside the tile keeps registers low).
    Masked rows / columns hold finite garbage: callers mask them. A float32 ``w`` with bf16/fp16
    ``h`` (autocast) is cast to ``h``'s type tile by tile in registers (a no-op for one dtype)."""
    offs_k = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = (w_ptr + v0 * stride_w) + cols[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        if EVEN_H:
            a = tl.load(h_ptrs, mask=mask_m[:, None], other=0.0)
            b = operand(tl.load(w_ptrs, mask=mask_v[None, :], other=0.0), h_ptr.dtype.element_ty, UPCAST)
        else:
            kmask = offs_k + k < H
            a = tl.load(h_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
            b = operand(tl.load(w_ptrs, mask=kmask[:, None] & mask_v[None, :], other=0.0),
                        h_ptr.dtype.element_ty, UPCAST)
        acc = dot(a, b, acc, PREC, UPCAST)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return scale_logits_tile(acc, b_ptr, v0, cols, mask_v, temperature, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def scale_logits_tile(z, b_ptr, c0, cols, mask_c, temperature, softcap,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(softcap(z + b[c0 + cols]) / temperature, tanh)`` of a float32 tile of raw logits (tanh = the
    logits themselves without a softcap): the one owner of this step in Triton (the fused forward, the
    backward kernels, the GEMM-tiled forward's and the one-pass path's row kernels)."""
    if HAS_BIAS:
        z += tl.load(b_ptr + c0 + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    t = z
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        z = softcap * t
    return z / temperature, t


@triton.jit
def dz_tile(z, t, cols, tgt, v0, lse, gl, gp, ge, ent, mask_m, mask_v, temperature,
            HAS_GENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The logits gradient of a tile (the one owner of the formula in the Triton kernels)::

        dz = (gl * onehot - gp * p - ge * p * (log p + H)) / temperature   [* (1 - tanh^2) softcap]

    with ``gl = dL/dlogp``, ``gp = gl - dL/dlse`` (``gp = gl`` without an lse gradient) and
    ``ge = dL/dH``. Padded rows / columns give exactly 0 (``where``, not a product: 0 * NaN = NaN)."""
    logp = z - lse[:, None]
    prob = tl.exp(logp)
    dz = tl.where(cols[None, :] == (tgt - v0).to(tl.int32)[:, None], gl[:, None], 0.0) \
        - gp[:, None] * prob
    if HAS_GENT:
        dz -= ge[:, None] * tl.where(prob > 0, prob * (logp + ent[:, None]), 0.0)   # -inf logits: 0
    dz = dz / temperature
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    return tl.where(mask_m[:, None] & mask_v[None, :], dz, 0.0)


@triton.jit
def online_update(m_i, s_i, t_i, zt_i, z, cols, mask_v, tgt_off):
    """Fold a ``[R, C]`` logits tile ``z`` (columns ``cols``, valid where ``mask_v``; the target's
    column offset ``tgt_off`` per row) into the running per-row statistics, all relative to the
    running max ``m``: ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)``, ``zt = z[target]``
    (docs/kernels.md, "Forward"). The one owner of the update in both forward kernels."""
    zt_i += tl.sum(tl.where(cols[None, :] == tgt_off.to(tl.int32)[:, None], z, 0.0), 1)
    z = tl.where(mask_v[None, :], z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, 1))
    # rows whose logits so far are all -inf (masked columns, a -inf bias): shift by 0 instead
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)                       # 0 while m_i = -inf
    shift = tl.where(s_i > 0, m_i - m_use, 0.0)       # avoids -inf * 0
    zc = z - m_use[:, None]
    e = tl.exp(zc)                                    # 0 for -inf logits
    zc = tl.where(e > 0, zc, 0.0)                     # no 0 * -inf
    t_i = alpha * (t_i + shift * s_i) + tl.sum(e * zc, 1)
    s_i = alpha * s_i + tl.sum(e, 1)
    return m_new, s_i, t_i, zt_i


@triton.jit
def grad_tile(pid, M, v_lo, v_hi, h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr, gl_ptr,
              ge_ptr, gs_ptr, H, stride_h, stride_w, temperature, softcap,
              HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
              HAS_GLSE: tl.constexpr, EVEN_H: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr):
    """Program ``pid``'s logit-gradient tile of the rows ``rows_ptr[0:M]`` x columns ``[v_lo, v_hi)``,
    in the grouped order (GROUP_N token blocks x every tile of the range, token block fastest, for L2
    reuse): recompute the logits (``logits_tile``), load the row coefficients, form ``dz`` (``dz_tile``).
    Shared by both backward kernels. Returns ``(dz, offs_m, mask_m, rows, v0, cols, mask_v, gl, gp, ge)``
    (``gp = gl - g_lse``; ``ge = gl`` / ``gp = gl`` when their flag is off)."""
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
    return dz, offs_m, mask_m, rows, v0, cols, mask_v, gl, gp, ge
