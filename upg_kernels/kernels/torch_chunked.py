"""Chunked pure-PyTorch backend: bounded memory, any device (the CPU default).

Tokens are processed in chunks of ``chunk_rows(V)`` rows, so the logits exist one chunk x V block at a
time (``UPG_KERNELS_TORCH_CHUNK_BYTES`` bytes per float32 block, 64 MiB by default), never N x V. A chunk
holds a few such blocks at once (logits, probabilities, dz: about 3-5x the budget), and the backward
keeps a float32 ``[V, H]`` dweight accumulator (plus a float32 copy of a bf16/fp16 weight for dhidden).
"""
from __future__ import annotations

import os

import torch

from .contract import LogprobParams, active_rows
from .meta import nonzero_rows


def chunk_rows(V: int) -> int:
    budget = int(os.environ.get("UPG_KERNELS_TORCH_CHUNK_BYTES", 64 * 2**20))
    return max(1, budget // (4 * max(V, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h, weight, bias, p: LogprobParams):
    """Scaled logits of a chunk, in float32 (float64 for float64 inputs), and tanh for the softcap."""
    return scale_logits((h @ weight.T).to(_compute_dtype(h.dtype)), bias, p)


def scale_logits(z, bias, p: LogprobParams):
    """``(softcap(z + bias) / temperature, tanh)`` of raw logits ``z`` (tanh = None without a softcap;
    the backward's chain-rule factor is ``1 - tanh^2``). Shared with ``grad_in_forward``."""
    if bias is not None:
        z = z + bias.to(z.dtype)
    t = None
    if p.softcap:
        t = torch.tanh(z / p.softcap)
        z = p.softcap * t
    return z / p.temperature, t


def forward(hidden, weight, bias, targets, p: LogprobParams):
    N = hidden.shape[0]
    cd = _compute_dtype(hidden.dtype)
    logp = torch.zeros(N, dtype=cd, device=hidden.device)
    ent = torch.zeros(N, dtype=cd, device=hidden.device)
    lse = torch.zeros(N, dtype=cd, device=hidden.device)
    valid = targets != p.ignore_index
    rows = nonzero_rows(valid)
    step = chunk_rows(weight.shape[0])
    for s in range(0, rows.numel(), step):
        idx = rows[s:s + step]
        z, _ = _logits(hidden[idx], weight, bias, p)
        m = z.max(-1, keepdim=True).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(z - m)
        se = e.sum(-1)
        l = m.squeeze(-1) + torch.log(se)
        lse[idx] = l
        logp[idx] = z.gather(1, targets[idx].unsqueeze(1)).squeeze(1) - l
        ent[idx] = l - torch.where(e > 0, e * z, 0.0).sum(-1) / se   # -inf logits (bias) add 0
        del z, e
    f32 = torch.float32 if cd == torch.float32 else cd
    return logp.to(f32), ent.to(f32), lse.to(f32)


def backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p: LogprobParams,
             need_hidden=True, need_weight=True, need_bias=True, g_lse=None):
    N, H = hidden.shape
    cd = _compute_dtype(hidden.dtype)
    rows, g_logp, g_ent, g_lse = active_rows(targets, g_logp, g_ent, g_lse, p.ignore_index)
    dh = torch.zeros_like(hidden) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_weight else None
    db = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) \
        if (need_bias and bias is not None) else None
    step = chunk_rows(weight.shape[0])
    wmat = weight.to(cd) if need_hidden else None   # no copy when already in the compute dtype
    for s in range(0, rows.numel(), step):
        idx = rows[s:s + step]
        h = hidden[idx]
        z, t = _logits(h, weight, bias, p)
        logprob = z - lse[idx].to(cd).unsqueeze(1)
        prob = torch.exp(logprob)
        gl = g_logp[idx].to(cd).unsqueeze(1)
        gp = gl if g_lse is None else gl - g_lse[idx].to(cd).unsqueeze(1)
        dz = -gp * prob
        dz.scatter_add_(1, targets[idx].unsqueeze(1), gl)
        if g_ent is not None:
            ge = g_ent[idx].to(cd).unsqueeze(1)
            dz -= ge * torch.where(prob > 0, prob * (logprob + ent[idx].to(cd).unsqueeze(1)), 0.0)
        dz /= p.temperature
        if t is not None:
            dz *= 1.0 - t * t
        del z, prob, logprob
        if need_hidden:
            dh[idx] = (dz @ wmat).to(hidden.dtype)
        if need_weight:
            dw += dz.T @ h.to(cd)
        if db is not None:
            db += dz.sum(0)
    return (dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)
