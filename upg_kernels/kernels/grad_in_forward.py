"""Gradients in the forward pass (opt-in, token-local losses): 6·N·H·V flops instead of 8·N·H·V.

The separate forward + backward compute the logits twice (2NHV forward, 2NHV recomputed in the
backward, plus 4NHV of products). When the loss is token-local (each token's coefficients depend only
on its own log-prob and entropy), the coefficients of a chunk of tokens are known as soon as its
logits are, so one pass can do everything::

    for each chunk c of rows (G rows x the whole vocabulary, float32, in a granted workspace):
        z = logits(h_c)                        # one GEMM (2·G·H·V)
        lse, logp, H of c                      # from the materialized chunk
        g_lp, g_H = coef_fn(...)[c]            # the loss's coefficients of these tokens
        dz = g_lp (onehot - p) - g_H p (log p + H)   (/T, softcap chain)
        dh[c] = dz @ W ;  dW += dz^T h_c ;  db += sum dz     # two GEMMs (4·G·H·V)

The backward then only scales the stored ``dh, dW, db`` by ``grad_output``. The price is memory: the
chunk workspace (``(8 + e)·G·V`` bytes: float32 log-probs and probabilities plus the dz operand; see
:func:`chunk_plan`) and the gradients held from the forward to the backward. dW accumulates in float32
GEMMs into the weight's dtype (one rounding per chunk), or into a float32 ``[V, H]`` buffer (one
rounding) when the budget holds it too. Plain PyTorch (cuBLAS GEMMs on CUDA); runs on any
device, so it is tested on the CPU directly.
"""
from __future__ import annotations

import torch

from .contract import LogprobParams
from .gemm import mm_acc, mm_f32
from .meta import nonzero_rows
from .torch_chunked import scale_logits

def chunk_plan(V: int, H: int, dtype: torch.dtype, budget: int, need_weight: bool = True):
    """``(rows per chunk, float32 dW accumulator?)`` within ``budget`` bytes: a chunk costs
    ``(2 * 4 + e) * V`` bytes a row (float32 log-probs and probabilities, the dz operand of element
    size ``e``; float64 inputs: 16 + 8); a float32 ``[V, H]`` dW accumulator (one rounding of a
    bf16/fp16 dW instead of one per chunk) is taken when ``4 V H`` more bytes fit beside 16 rows."""
    e = torch.empty((), dtype=dtype).element_size()
    per_row = (2 * (8 if dtype == torch.float64 else 4) + e) * V
    dw32 = need_weight and dtype not in (torch.float32, torch.float64) and \
        budget >= 4 * V * H + 16 * per_row
    rows = (budget - (4 * V * H if dw32 else 0)) // per_row
    if rows < 1:
        raise ValueError(f"grad_in_forward needs a workspace of at least {per_row} bytes (one row of "
                         f"the V={V} vocabulary; a few thousand rows are fast); it has {budget}: raise "
                         "UPG_KERNELS_WORKSPACE_BYTES")
    return int(rows), bool(dw32)


def forward_with_grads(hidden, weight, bias, targets, p: LogprobParams, coef_fn, budget: int, *,
                       need_hidden=True, need_weight=True, need_bias=True):
    """``(logp, ent, lse, dh, dw, db)`` with the gradients of the loss whose per-token coefficients
    ``coef_fn(logp [N], ent [N], done [N] bool) -> (g_lp [N], g_H [N])`` returns (read at the rows
    of ``done``' last chunk only, so a token-local ``coef_fn`` may leave the others arbitrary)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    G, dw32 = chunk_plan(V, H, hidden.dtype, budget, need_weight)
    logp = torch.zeros(N, dtype=cd, device=dev)
    ent = torch.zeros(N, dtype=cd, device=dev)
    lse = torch.zeros(N, dtype=cd, device=dev)
    dh = torch.zeros(N, H, dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = torch.zeros(V, H, dtype=weight.dtype, device=dev) if need_weight else None
    dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev) if (need_weight and dw32) else dw
    db_acc = torch.zeros(V, dtype=cd, device=dev) if (need_bias and bias is not None) else None
    rows = nonzero_rows(targets != p.ignore_index)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    for s in range(0, rows.numel(), G):
        idx = rows[s:s + G]
        h = hidden.index_select(0, idx)
        z, tanh = scale_logits(h @ weight.t() if hidden.dtype == torch.float64 else mm_f32(h, weight.t()),
                               bias, p)
        l = torch.logsumexp(z, -1)
        z -= l[:, None]                                 # z is now log p
        prob = torch.exp(z)
        tgt = targets[idx]
        e = -(torch.where(prob > 0, prob * z, 0.0)).sum(-1)
        lse[idx] = l
        ent[idx] = e
        logp[idx] = z.gather(1, tgt[:, None]).squeeze(1)
        done.zero_()
        done[idx] = True
        g_lp, g_H = coef_fn(logp, ent, done)
        gl, ge = g_lp[idx].to(cd)[:, None], g_H[idx].to(cd)[:, None]
        # dz = gl * onehot - gl * p - ge * p * (log p + H), in place in ``prob``
        z += e[:, None]
        z *= prob
        z *= ge
        prob *= gl
        prob += z
        prob.neg_()
        prob.scatter_add_(1, tgt[:, None], gl)
        del z
        prob /= p.temperature
        if tanh is not None:
            prob *= 1.0 - tanh * tanh
            del tanh
        dz = prob.to(hidden.dtype)
        del prob
        if need_hidden:
            dh.index_copy_(0, idx, dz @ weight)
        if need_weight:
            mm_acc(dw_acc, dz.t(), h)
        if db_acc is not None:
            db_acc += dz.sum(0, dtype=cd)
        del dz
    if need_weight and dw32:
        dw.copy_(dw_acc)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    f32 = torch.float32 if cd == torch.float32 else cd
    return logp.to(f32), ent.to(f32), lse.to(f32), dh, dw, db
