"""Plain-PyTorch reference math (materializes the logits; for tests and documentation).

Everything here is the definition the fast paths are tested against: run it in float64.
"""
from __future__ import annotations

import torch


def scaled_logits(hidden, weight, bias=None, temperature=1.0, softcap=None):
    """``z = softcap(hidden @ weight.T + bias) / temperature`` materialized, in the inputs' dtype."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0,
                             ignore_index=-100, softcap=None, return_entropy=False):
    """Reference for :func:`upg_kernels.token_logprobs`: per-token log-prob of the target and
    entropy of ``softmax(z)``; both 0 where ``targets == ignore_index``. Differentiable."""
    z = scaled_logits(hidden, weight, bias, temperature, softcap)
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    if not return_entropy:
        return logp
    # p log p with p = 0 (a -inf logit) is 0; the where keeps the gradient finite too
    finite = torch.where(torch.isfinite(logp_all), logp_all, torch.zeros_like(logp_all))
    ent = -(logp_all.exp() * finite).sum(-1)
    ent = torch.where(valid, ent, zero)
    return logp, ent
