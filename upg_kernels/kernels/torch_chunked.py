"""Chunked pure-PyTorch backend: bounded memory, any device (the CPU default).

Tokens are processed in chunks of ``chunk_rows(V)`` rows, so the logits exist one chunk x V block at a
time (``UPG_KERNELS_TORCH_CHUNK_BYTES`` bytes per float32 block, 64 MiB by default), never N x V. A chunk
holds a few such blocks at once (logits, probabilities, dz: about 3-5x the budget), and the backward
keeps a float32 ``[V, H]`` dweight accumulator (plus a float32 copy of a bf16/fp16 weight for dhidden).
A float32 weight with bf16/fp16 hidden states (autocast) is cast slab by slab (``workspace.WeightSlabs``):
the logits and dhidden products then run over vocabulary slabs of at most ``UPG_KERNELS_CAST_SLAB_BYTES``.
"""
from __future__ import annotations

import torch

from ..settings import TORCH_CHUNK_BYTES

from .capturable import backward_rows, finish_forward, forward_rows
from .contract import LogprobParams
from .workspace import WeightSlabs


def chunk_rows(V: int) -> int:
    budget = TORCH_CHUNK_BYTES.get()
    return max(1, budget // (4 * max(V, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h, slabs: WeightSlabs, bias, p: LogprobParams):
    """Scaled logits of a chunk, in float32 (float64 for float64 inputs), and tanh for the softcap;
    ``h @ W^T`` in the operand dtype, slab by slab when the weight is cast."""
    cd = _compute_dtype(h.dtype)
    if not slabs.cast:
        return scale_logits_((h @ slabs.weight.T).to(cd), bias, p)
    z = torch.empty(h.shape[0], slabs.weight.shape[0], dtype=cd, device=h.device)
    for v0, v1 in slabs.bounds():
        z[:, v0:v1] = h @ slabs(v0, v1).T
    return scale_logits_(z, bias, p)


def scale_logits_(z, bias, p: LogprobParams):
    """``(softcap(z + bias) / temperature, tanh)`` of raw logits ``z``, **in place** in ``z`` (tanh = None
    without a softcap; the backward's chain-rule factor is ``1 - tanh^2``). The one owner of this step in
    PyTorch: the torch backend and the one-pass path's PyTorch rows call it."""
    if bias is not None:
        z += bias.to(z.dtype)
    t = None
    if p.softcap:
        t = torch.tanh(z / p.softcap)
        torch.mul(t, p.softcap, out=z)
    if p.temperature != 1.0:
        z /= p.temperature
    return z, t


def logits_grad_(logp, targets, gl, gp, ge, ent, temperature, tanh=None, prob=None):
    """The logits gradient of a chunk of rows: the one owner of the formula in PyTorch (the torch
    backend's backward and the one-pass path's PyTorch rows call it)::

        dz = (gl * onehot - gp * p - ge * p * (log p + H)) / temperature   [* (1 - tanh^2) softcap]

    ``logp [R, V]``: the chunk's log-probabilities (float32 / float64), **overwritten** (scratch);
    ``targets [R]``; per-row ``gl = dL/dlogp``, ``gp = gl - dL/dlse`` (``gl`` without an lse
    gradient), ``ge = dL/dH`` (None: no entropy term) and the entropy ``ent``; ``tanh`` the softcap's
    (None without one); ``prob = exp(logp)`` when the caller has it (it is then overwritten too).
    Returns ``dz [R, V]`` (in ``prob``'s storage: one new block at most). Columns of probability 0
    (-inf logits) give exactly ``gl * onehot`` (no ``0 * -inf``)."""
    if prob is None:
        prob = torch.exp(logp)
    if ge is not None:
        logp += ent[:, None]
        logp *= prob
        logp.masked_fill_(prob == 0, 0.0)
        logp *= ge[:, None]              # ge * p * (log p + H)
    prob *= gp[:, None]
    if ge is not None:
        prob += logp
    prob.neg_()
    prob.scatter_add_(1, targets[:, None], gl[:, None])
    prob /= temperature
    if tanh is not None:
        prob *= 1.0 - tanh * tanh
    return prob


def forward(hidden, weight, bias, targets, p: LogprobParams):
    N = hidden.shape[0]
    cd = _compute_dtype(hidden.dtype)
    logp = torch.zeros(N, dtype=cd, device=hidden.device)
    ent = torch.zeros(N, dtype=cd, device=hidden.device)
    lse = torch.zeros(N, dtype=cd, device=hidden.device)
    rows, tg, valid = forward_rows(targets, p)
    step = chunk_rows(weight.shape[0])
    slabs = WeightSlabs(weight, hidden.dtype)
    for s in range(0, rows.numel(), step):
        idx = rows[s:s + step]
        z, _ = _logits(hidden[idx], slabs, bias, p)
        m = z.max(-1, keepdim=True).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(z - m)
        se = e.sum(-1)
        l = m.squeeze(-1) + torch.log(se)
        lse[idx] = l
        logp[idx] = z.gather(1, tg[idx].unsqueeze(1)).squeeze(1) - l
        ent[idx] = l - torch.where(e > 0, e * z, 0.0).sum(-1) / se   # -inf logits (bias) add 0
        del z, e
    f32 = torch.float32 if cd == torch.float32 else cd
    return finish_forward((logp.to(f32), ent.to(f32), lse.to(f32)), valid)


def backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p: LogprobParams,
             need_hidden=True, need_weight=True, need_bias=True, g_lse=None):
    N, H = hidden.shape
    cd = _compute_dtype(hidden.dtype)
    hidden, targets, lse, ent, rows, g_logp, g_ent, g_lse = backward_rows(
        hidden, targets, lse, ent, g_logp, g_ent, g_lse, p)
    dh = torch.zeros_like(hidden) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_weight else None
    db = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) \
        if (need_bias and bias is not None) else None
    step = chunk_rows(weight.shape[0])
    slabs = WeightSlabs(weight, hidden.dtype)
    # dhidden's operand: the weight in the compute dtype (no copy when it is already); a weight cast
    # slab by slab is multiplied slab by slab
    wmat = weight.to(cd) if need_hidden and not slabs.cast else None
    for s in range(0, rows.numel(), step):
        idx = rows[s:s + step]
        h = hidden[idx]
        z, t = _logits(h, slabs, bias, p)
        z -= lse[idx].to(cd).unsqueeze(1)                 # log p
        gl = g_logp[idx].to(cd)
        gp = gl if g_lse is None else gl - g_lse[idx].to(cd)
        ge = None if g_ent is None else g_ent[idx].to(cd)
        dz = logits_grad_(z, targets[idx], gl, gp, ge, ent[idx].to(cd), p.temperature, t)
        del z, t
        if need_hidden and wmat is not None:
            dh[idx] = (dz @ wmat).to(hidden.dtype)
        elif need_hidden:
            acc = torch.zeros(dz.shape[0], H, dtype=cd, device=dz.device)
            for v0, v1 in slabs.bounds():
                acc.addmm_(dz[:, v0:v1], slabs(v0, v1).to(cd))
            dh[idx] = acc.to(hidden.dtype)
        if need_weight:
            dw += dz.T @ h.to(cd)
        if db is not None:
            db += dz.sum(0)
    return (dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)
