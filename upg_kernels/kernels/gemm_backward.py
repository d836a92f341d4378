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

from dataclasses import dataclass

import torch
import triton

from .contract import active_rows, zero_grads
from .gemm import mm_acc
from .workspace import set_workspace_bytes, workspace_bytes  # noqa: F401 (re-export)
from .triton_dz import dz_block, dz_config
from .triton_logprobs_common import check_inputs, interpreting

_SLAB_COLS = 4096          # vocabulary columns per slab (the K of the dh GEMM)
_SLAB_COLS_INTERP = 64     # under the interpreter: several slabs at test sizes


@dataclass(frozen=True)
class GemmPlan:
    group_rows: int        # G: active rows per token group
    slab_cols: int         # S: vocabulary columns per slab
    dw_fp32: bool          # dW accumulates in a float32 [V, H] buffer (one rounding)
    workspace_bytes: int   # bytes the plan allocates besides the outputs (dz, dh_acc, h_g, fp32 dW)

    def n_groups(self, M: int) -> int:
        return triton.cdiv(M, self.group_rows) if M else 0


def plan(M: int, H: int, V: int, dtype: torch.dtype, budget: int | None = None, *,
         need_hidden: bool = True, need_weight: bool = True, gather: bool = True,
         gpu: bool = False) -> GemmPlan:
    """Token-group and slab sizes for ``M`` active rows within ``budget`` bytes of workspace.

    The largest group that fits (fewer dW roundings, fewer passes over W), at least ``_MIN_GROUP``
    rows (the dz kernel's BLOCK_N); the slab grows past ``_SLAB_COLS`` only when every row fits in
    one group. ``gpu=True``: the CUDA plan even under the interpreter (bench/roofline.py)."""
    budget = workspace_bytes() if budget is None else budget
    e = 4 if dtype == torch.float32 else 2
    interp = interpreting() and not gpu
    cfg = dz_config(dtype, H, gpu=gpu)
    bv, min_g = cfg.block_v, cfg.block_n
    v_pad = triton.cdiv(V, bv) * bv
    S = min(v_pad, _SLAB_COLS_INTERP if interp else _SLAB_COLS)
    per_row_h = (4 * H if need_hidden else 0) + (e * H if (need_weight and gather) else 0)
    dw32 = 4 * V * H if (need_weight and dtype != torch.float32) else 0
    use32 = dw32 > 0 and budget >= dw32 + min_g * (S * e + per_row_h)
    left = budget - (dw32 if use32 else 0)
    G = max(min_g, left // (S * e + per_row_h) // min_g * min_g)
    m_pad = max(16, triton.cdiv(max(M, 1), 16) * 16)
    if G >= m_pad:
        G = m_pad
        if not interp:
            S = max(S, min(v_pad, (left - G * per_row_h) // (G * e) // bv * bv))
    used = G * S * e + G * per_row_h + (dw32 if use32 else 0)
    return GemmPlan(int(G), int(S), bool(use32), int(used))


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
    dh, dw, db, need_bias = zero_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
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
                mm_acc(acc, dz, weight[v0:v1])
            if need_weight:
                mm_acc(dw_acc[v0:v1], dz.t(), h_g)
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
