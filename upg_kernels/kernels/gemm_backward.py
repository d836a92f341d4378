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

Autocast (a float32 weight, bf16/fp16 hidden states): the dz kernel casts each W tile in registers,
the dh GEMM takes W slab by slab cast into one ``[S, H]`` buffer (``workspace.WeightSlabs``; ``S`` is then
at most ``UPG_KERNELS_CAST_SLAB_BYTES / (2·H)`` columns, and the buffer counts in the workspace), and dW
accumulates straight into the float32 output (exact, no accumulator).

Cost: ``6·M·H·V`` flops (recompute + two products), all on tensor cores; W is read ``3·ceil(M/G)``
times from HBM, dW read and written ``ceil(M/G)`` times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .contract import zero_grads
from .capturable import backward_rows
from .gemm import mm_acc
from .workspace import (WeightSlabs, balanced_rows, cast_rows, group_bounds, keeps_weight,  # noqa: F401
                        set_workspace_bytes, workspace_bytes)  # (re-export)
from .triton_dz import dz_block, dz_config
from .triton_logprobs_common import check_inputs, interpreting

_SLAB_COLS = 4096          # vocabulary columns per slab (the K of the dh GEMM)
_SLAB_COLS_INTERP = 64     # under the interpreter: several slabs at test sizes
# bf16/fp16 dW without a float32 [V, H] accumulator: at most this many roundings of each element (one
# per token group, in the fused loop); more token groups switch to the separate dW pass (one rounding)
MAX_DW_ROUNDINGS = 8


@dataclass(frozen=True)
class GemmPlan:
    group_rows: int        # G: active rows per token group
    slab_cols: int         # S: vocabulary columns per slab
    dw_fp32: bool          # dW accumulates in a float32 [V, H] buffer (one rounding)
    workspace_bytes: int   # bytes the plan allocates besides the outputs (dz, dh_acc, h_g, fp32 dW)
    dw_mode: str = "fused"  # "fused": dW in the group loop; "pass": a separate slab-outer dW pass
    dw_group_rows: int = 0  # the dW pass: rows per token group
    dw_slab_cols: int = 0   # the dW pass: columns of its float32 slab accumulator
    tile: int = 16          # the dz kernel's BLOCK_N: group starts are multiples of it

    def n_groups(self, M: int) -> int:
        return triton.cdiv(M, self.group_rows) if M else 0

    def bounds(self, M: int, dw_pass: bool = False) -> list[tuple[int, int]]:
        """The token groups ``[(g0, g1)]`` of the group loop (or of the dW pass): balanced, at most
        ``group_rows`` (``dw_group_rows``) rows each (:func:`workspace.group_bounds`)."""
        return group_bounds(M, self.dw_group_rows if dw_pass else self.group_rows, self.tile)

    def dw_roundings(self, M: int, dtype: torch.dtype) -> int:
        """How often each dW element is rounded into the weight's dtype (0: float32 weights, exact)."""
        if dtype == torch.float32:
            return 0
        return 1 if (self.dw_fp32 or self.dw_mode == "pass") else self.n_groups(M)


def plan(M: int, H: int, V: int, dtype: torch.dtype, budget: int | None = None, *,
         need_hidden: bool = True, need_weight: bool = True, gather: bool = True,
         gpu: bool = False, w_dtype: torch.dtype | None = None) -> GemmPlan:
    """Token-group and slab sizes for ``M`` active rows within ``budget`` bytes of workspace.

    The largest group that fits (fewer dW roundings, fewer passes over W), at least one dz tile
    (``BLOCK_N`` rows), then balanced (:func:`workspace.balanced_rows`: equal groups, no small tail);
    the slab grows past ``_SLAB_COLS`` only when every row fits in one group. bf16/fp16 dW: a float32
    ``[V, H]`` accumulator when the budget holds it; else dW is accumulated in the weight's dtype in
    the group loop while that rounds each element at most :data:`MAX_DW_ROUNDINGS` times; beyond, dW
    gets its own slab-outer pass (float32 ``[S_w, H]`` slab accumulator across all token groups, one
    rounding; the dz blocks are recomputed: 2·M·H·V more flops). ``gpu=True``: the CUDA plan even
    under the interpreter (bench/roofline.py). ``w_dtype``: the weight's dtype (default ``dtype``);
    a float32 weight with bf16/fp16 ``dtype`` (autocast) needs no dW accumulator, and with dhidden
    its slabs are cast into a ``[S, H]`` buffer of at most ``UPG_KERNELS_CAST_SLAB_BYTES``."""
    budget = workspace_bytes() if budget is None else budget
    w_dtype = dtype if w_dtype is None else w_dtype
    e = 4 if dtype == torch.float32 else 2
    interp = interpreting() and not gpu
    cfg = dz_config(dtype, H, gpu=gpu)
    bv, tile = cfg.block_v, cfg.block_n
    v_pad = triton.cdiv(V, bv) * bv
    cast = need_hidden and keeps_weight(w_dtype, dtype)
    s_cap = min(v_pad, cast_rows(H, dtype, bv)) if cast else v_pad
    S = min(s_cap, _SLAB_COLS_INTERP if interp else _SLAB_COLS)
    h_gather = e * H if (need_weight and gather) else 0
    per_row_h = (4 * H if need_hidden else 0) + h_gather
    dw32 = 4 * V * H if (need_weight and w_dtype != torch.float32) else 0
    use32 = dw32 > 0 and budget >= dw32 + tile * (S * e + per_row_h)
    left = budget - (dw32 if use32 else 0) - (S * H * e if cast else 0)
    g_max = max(tile, left // (S * e + per_row_h) // tile * tile)
    m_pad = max(16, triton.cdiv(max(M, 1), 16) * 16)
    if g_max >= m_pad:
        G = m_pad
        if not interp:
            S = max(S, min(s_cap, (left - G * per_row_h) // (G * e) // bv * bv))
    else:
        G = balanced_rows(M, g_max, tile)
    mode, Gw, Sw = "fused", 0, 0
    if dw32 and not use32 and triton.cdiv(max(M, 1), G) > MAX_DW_ROUNDINGS:
        # dW in its own pass: the group loop keeps dh (and db) only, with bigger groups
        mode = "pass"
        if need_hidden:
            g_max = max(tile, budget // (S * e + 4 * H) // tile * tile)
            G = m_pad if g_max >= m_pad else balanced_rows(M, g_max, tile)
        Sw = min(v_pad, S, max(bv, budget // 2 // (4 * H) // bv * bv))   # half the budget: the slab
        gw_max = max(tile, (budget - 4 * Sw * H) // (Sw * e + h_gather) // tile * tile)
        Gw = m_pad if gw_max >= m_pad else balanced_rows(M, gw_max, tile)
    used = G * S * e + G * (4 * H if need_hidden else 0) + (dw32 if use32 else 0) \
        + (S * H * e if cast else 0)
    if mode == "pass":
        used = max(used, Gw * Sw * e + 4 * Sw * H + Gw * h_gather)
    else:
        used += G * h_gather
    return GemmPlan(int(G), int(S), bool(use32), int(used), mode, int(Gw), int(Sw), int(tile))


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
    hidden, targets, lse, ent, rows, g_logp, g_ent, g_lse = backward_rows(
        hidden, targets, lse, ent, g_logp, g_ent, g_lse, p)
    M = rows.numel()
    if M == 0:
        return dh, dw, db
    lse = lse.to(torch.float32).contiguous()
    ent = ent.to(torch.float32).contiguous()
    dense = M == N   # every row active: groups are slices of hidden (no gather, no scatter)

    pl = plan(M, H, V, hidden.dtype, need_hidden=need_hidden, need_weight=need_weight,
              gather=not dense, w_dtype=weight.dtype)
    two_pass = need_weight and pl.dw_mode == "pass"
    args = (hidden, weight, bias, targets, rows, lse, ent, g_logp, g_ent, g_lse, p, dense)
    dw_acc = dw
    if need_weight and pl.dw_fp32:
        dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev)
    db_acc = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None
    if need_hidden or need_bias or not two_pass:
        _group_loop(pl.bounds(M), pl.group_rows, pl.slab_cols, args, dh if need_hidden else None,
                    None if two_pass or not need_weight else dw_acc, db_acc)
    if two_pass:
        _dw_pass(pl.bounds(M, dw_pass=True), pl.dw_group_rows, pl.dw_slab_cols, args, dw)
    if need_weight and pl.dw_fp32:
        dw.copy_(dw_acc)
    if need_bias:
        db.copy_(db_acc)
    return dh, dw, db


def _group_loop(groups, G, S, args, dh, dw_acc, db_acc):
    """Token-group-outer loop: dh (one rounding per row), and dW / db when given (``dw_acc``: the
    float32 ``[V, H]`` accumulator, or dW itself: one rounding per group)."""
    hidden, weight, bias, targets, rows, lse, ent, g_logp, g_ent, g_lse, p, dense = args
    M, H, V = rows.numel(), hidden.shape[1], weight.shape[0]
    dz_buf = torch.empty(min(G, M), min(S, V), dtype=hidden.dtype, device=hidden.device)
    dh_acc = (torch.empty(min(G, M), H, dtype=torch.float32, device=hidden.device)
              if dh is not None else None)
    slabs = WeightSlabs(weight, hidden.dtype, rows=S) if dh is not None else None
    for g0, g1 in groups:
        idx = rows[g0:g1]
        h_g = None
        if dw_acc is not None:
            h_g = hidden[g0:g1] if dense else hidden.index_select(0, idx)
        acc = None
        if dh is not None:
            acc = dh_acc[:g1 - g0]
            acc.zero_()
        for v0 in range(0, V, S):
            v1 = min(V, v0 + S)
            dz = dz_buf[:g1 - g0, :v1 - v0]
            dz_block(dz, hidden, weight, bias, targets, idx, lse, ent, g_logp, g_ent, g_lse, v0, v1, p)
            if dh is not None:
                mm_acc(acc, dz, slabs(v0, v1))
            if dw_acc is not None:
                mm_acc(dw_acc[v0:v1], dz.t(), h_g)
            if db_acc is not None:
                db_acc[v0:v1] += dz.sum(0, dtype=torch.float32)
        if dh is not None:
            if dense:
                dh[g0:g1].copy_(acc)
            else:
                dh.index_copy_(0, idx, acc.to(hidden.dtype))


def _dw_pass(groups, G, S, args, dw):
    """Vocabulary-slab-outer dW: each slab's float32 ``[S, H]`` accumulator sums every token group,
    then is rounded into dW once (the dz blocks are recomputed)."""
    hidden, weight, bias, targets, rows, lse, ent, g_logp, g_ent, g_lse, p, dense = args
    M, H, V = rows.numel(), hidden.shape[1], weight.shape[0]
    dz_buf = torch.empty(min(G, M), min(S, V), dtype=hidden.dtype, device=hidden.device)
    acc_buf = torch.empty(min(S, V), H, dtype=torch.float32, device=hidden.device)
    h_buf = (None if dense or M <= G
             else torch.empty(min(G, M), H, dtype=hidden.dtype, device=hidden.device))
    single = None if dense or M > G else hidden.index_select(0, rows)   # one group: gather once
    for v0 in range(0, V, S):
        v1 = min(V, v0 + S)
        acc = acc_buf[:v1 - v0]
        acc.zero_()
        for g0, g1 in groups:
            idx = rows[g0:g1]
            if dense:
                h_g = hidden[g0:g1]
            elif single is not None:
                h_g = single
            else:
                h_g = torch.index_select(hidden, 0, idx, out=h_buf[:g1 - g0])
            dz = dz_buf[:g1 - g0, :v1 - v0]
            dz_block(dz, hidden, weight, bias, targets, idx, lse, ent, g_logp, g_ent, g_lse, v0, v1, p)
            mm_acc(acc, dz.t(), h_g)
        dw[v0:v1].copy_(acc)
