"""Backend ``"triton"``: the Triton forward, and a backward whose three N·H·V products are GEMMs.

The backward walks the active rows (``kernels.active_rows``: non-zero coefficient, target not ignored)
in **token groups** of ``G`` rows and the vocabulary in **slabs** of ``S`` columns::

    for each token group g (G active rows, gathered: h_g [G, H]):
        dh_acc = 0                                   # float32 [G, H]
        for each vocabulary slab s (S columns):
            dz   = dz_block(h_g, W_s, lse, H, coefficients)   # Triton: logits recomputed on chip,
                                                               # dz written to a [G, S] workspace
            dh_acc += dz @ W_s                       # GEMM, fp32 accumulation
            dW_s   += dz^T @ h_g                     # GEMM (fp32 accumulation, see below)
            db_s   += sum_rows dz
        dh[rows of g] = dh_acc                       # one rounding into hidden's dtype

No atomics: every output element is written by one GEMM at a time, in a fixed order, so the gradients
are bitwise reproducible run to run (same device, same shapes). The workspace is bounded by a byte
budget (``UPG_KERNELS_WORKSPACE_BYTES``, 64 MiB by default, or ``set_workspace_bytes``):
``dz`` (``G x S`` in the operand dtype), ``dh_acc`` (``G x H`` float32) and ``h_g`` (``G x H``).

Rounding of dweight: with float32 weights dW accumulates in float32 (exact). With bf16/fp16 weights
it accumulates in the weight's dtype, one rounding per token group (``ceil(M / G)`` roundings of each
element; each GEMM accumulates in fp32 and adds the old value before rounding once) — unless the
budget also holds a float32 ``[V, H]`` accumulator (``4·V·H`` bytes), which the plan then uses (one
rounding). docs/kernels.md measures the resulting error against float64.

Cost: ``6·M·H·V`` flops (recompute + two products), all on tensor cores; W is read ``3·ceil(M/G)``
times from HBM, dW read and written ``ceil(M/G)`` times.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from . import active_rows
from .triton_dz import dz_block, dz_config
from .triton_logprobs_common import check_inputs, interpreting
from .triton_logprobs_fwd import forward  # noqa: F401  (the backend's forward)

WORKSPACE_BYTES = 64 * 2**20
_SLAB_COLS = 4096          # vocabulary columns per slab (the K of the dh GEMM)
_SLAB_COLS_INTERP = 64     # under the interpreter: several slabs at test sizes
_override = None


def set_workspace_bytes(n: int | None) -> None:
    """Set the backward's workspace budget in bytes (None: back to the environment / default)."""
    global _override
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ValueError(f"workspace bytes must be a positive int or None, got {n!r}")
    _override = n


def workspace_bytes() -> int:
    if _override is not None:
        return _override
    v = os.environ.get("UPG_KERNELS_WORKSPACE_BYTES", "").strip()
    if not v:
        return WORKSPACE_BYTES
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n <= 0:
        raise ValueError(f"UPG_KERNELS_WORKSPACE_BYTES must be a positive integer, got {v!r}")
    return n


@dataclass(frozen=True)
class GemmPlan:
    group_rows: int        # G: active rows per token group
    slab_cols: int         # S: vocabulary columns per slab
    dw_fp32: bool          # dW accumulates in a float32 [V, H] buffer (one rounding)
    workspace_bytes: int   # bytes the plan allocates besides the outputs (dz, dh_acc, h_g, fp32 dW)

    def n_groups(self, M: int) -> int:
        return triton.cdiv(M, self.group_rows) if M else 0


def plan(M: int, H: int, V: int, dtype: torch.dtype, budget: int | None = None, *,
         need_hidden: bool = True, need_weight: bool = True, gather: bool = True) -> GemmPlan:
    """Token-group and slab sizes for ``M`` active rows within ``budget`` bytes of workspace.

    The largest group that fits (fewer dW roundings, fewer passes over W), at least ``_MIN_GROUP``
    rows (the dz kernel's BLOCK_N); the slab grows past ``_SLAB_COLS`` only when every row fits in
    one group."""
    budget = workspace_bytes() if budget is None else budget
    e = 4 if dtype == torch.float32 else 2
    cfg = dz_config(dtype)
    bv, min_g = cfg.block_v, cfg.block_n
    v_pad = triton.cdiv(V, bv) * bv
    S = min(v_pad, _SLAB_COLS_INTERP if interpreting() else _SLAB_COLS)
    per_row_h = (4 * H if need_hidden else 0) + (e * H if (need_weight and gather) else 0)
    dw32 = 4 * V * H if (need_weight and dtype != torch.float32) else 0
    use32 = dw32 > 0 and budget >= dw32 + min_g * (S * e + per_row_h)
    left = budget - (dw32 if use32 else 0)
    G = max(min_g, left // (S * e + per_row_h) // min_g * min_g)
    m_pad = max(16, triton.cdiv(max(M, 1), 16) * 16)
    if G >= m_pad:
        G = m_pad
        if not interpreting():
            S = max(S, min(v_pad, (left - G * per_row_h) // (G * e) // bv * bv))
    used = G * S * e + G * per_row_h + (dw32 if use32 else 0)
    return GemmPlan(int(G), int(S), bool(use32), int(used))


# ------------------------------------------------------------------------------ fp32-accumulating GEMMs
_OUT_DTYPE_OK = {}


def _addmm_f32(c, a, b):
    """``c += a @ b`` for a float32 ``c`` and bf16/fp16 ``a``, ``b``, accumulating in fp32.

    CUDA (and meta): cuBLAS with a float32 output (``torch.addmm(..., out_dtype=float32)``, torch >= 2.8),
    else the product rounded to the operand dtype and added (one rounding per slab; noted in
    docs/kernels.md). CPU: the operands upcast (exactly) and multiplied in float32, which is what the
    tensor cores compute up to the summation order."""
    dev = c.device.type
    if dev == "cpu":
        c.addmm_(a.float(), b.float())
        return
    ok = _OUT_DTYPE_OK.get(dev)
    if ok is None or ok:
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            _OUT_DTYPE_OK[dev] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_OK[dev] = False
    c.add_(a @ b)


def _mm_acc(c, a, b):
    """``c += a @ b`` with fp32 accumulation; ``c`` in float32 or in the operands' dtype (then one
    rounding per call: cuBLAS computes ``a @ b + c`` in fp32 and rounds once)."""
    if c.dtype == a.dtype:
        if c.device.type == "cpu" and c.dtype != torch.float32 and c.dtype != torch.float64:
            c.copy_(c.float().addmm_(a.float(), b.float()))   # CPU: the same single rounding
        else:
            c.addmm_(a, b)
    else:
        _addmm_f32(c, a, b)


# ------------------------------------------------------------------------------ backward
def backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
             need_hidden=True, need_weight=True, need_bias=True, g_lse=None):
    if p.filter_eps > 0:   # tile filtering is a per-tile skip: the atomic kernel's (docs/kernels.md)
        from .triton_logprobs_bwd import backward as atomic_backward
        return atomic_backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
                               need_hidden, need_weight, need_bias, g_lse=g_lse)
    check_inputs(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_bias = bool(need_bias) and bias is not None
    dh = torch.zeros(N, H, dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = torch.zeros(V, H, dtype=weight.dtype, device=dev) if need_weight else None
    db = torch.zeros(V, dtype=bias.dtype, device=dev) if need_bias else None
    if not (need_hidden or need_weight or need_bias):
        return dh, dw, db
    bias = None if bias is None else bias.contiguous()
    targets = targets.contiguous()
    rows, g_logp, g_ent, g_lse = active_rows(targets, g_logp, g_ent, g_lse, p.ignore_index)
    M = rows.numel()
    if M == 0:
        return dh, dw, db
    lse = lse.to(torch.float32).contiguous()
    ent = ent.to(torch.float32).contiguous()
    dense = M == N   # every row active: groups are slices of hidden (no gather, no scatter)

    pl = plan(M, H, V, hidden.dtype, need_hidden=need_hidden, need_weight=need_weight,
              gather=not dense)
    G, S = pl.group_rows, pl.slab_cols
    op_dt = hidden.dtype                                  # GEMM operand dtype (= dz's)
    dz_buf = torch.empty(min(G, M), min(S, V), dtype=op_dt, device=dev)
    dh_acc = torch.empty(min(G, M), H, dtype=torch.float32, device=dev) if need_hidden else None
    dw_acc = dw
    if need_weight and pl.dw_fp32:
        dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev)
    db_acc = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None

    for g0 in range(0, M, G):
        g1 = min(M, g0 + G)
        idx = rows[g0:g1]
        h_g = hidden[g0:g1] if dense else (hidden.index_select(0, idx) if need_weight else None)
        acc = None
        if need_hidden:
            acc = dh_acc[:g1 - g0]
            acc.zero_()
        for v0 in range(0, V, S):
            v1 = min(V, v0 + S)
            dz = dz_buf[:g1 - g0, :v1 - v0]
            dz_block(dz, hidden, weight, bias, targets, idx, lse, ent, g_logp, g_ent, g_lse, v0, v1, p)
            if need_hidden:
                _mm_acc(acc, dz, weight[v0:v1])
            if need_weight:
                _mm_acc(dw_acc[v0:v1], dz.t(), h_g)
            if need_bias:
                db_acc[v0:v1] += dz.sum(0, dtype=torch.float32)
        if need_hidden:
            if dense:
                dh[g0:g1].copy_(acc)
            else:
                dh.index_copy_(0, idx, acc.to(hidden.dtype))
    if need_weight and pl.dw_fp32:
        dw.copy_(dw_acc)
    if need_bias:
        db.copy_(db_acc)
    return dh, dw, db
