"""Independent float64 reference for :func:`upg_kernels.preference_loss` (tests and documentation).

A plain transcription of the papers' formulas (docs/losses.md) over materialized logits: no code is
shared with the fused path.
"""
from __future__ import annotations

import torch


def preference_token_logprobs_reference(h, w, b, t, m=None, temperature=1.0, ignore_index=-100):
    """float64, materialized logits: ``(log softmax((h W^T + b) / temperature)[target] (0 where not valid),
    valid)`` with ``valid = (t != ignore_index) & m``."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z / temperature
    valid = t != ignore_index
    if m is not None:
        valid = valid & m
    lp = torch.log_softmax(z, -1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp)), valid


def preference_loss_reference(h, w, b, t, m, ref_c, ref_r, cfg, *, n_pairs=None, n_chosen_tokens=None):
    """The loss of :class:`~upg_kernels.PreferenceConfig` ``cfg`` on ``2B`` rows (``[:B]`` chosen).

    ``n_pairs`` / ``n_chosen_tokens``: the denominators of the pair mean and of the NLL term when they
    are the whole batch's (``preference_loss(..., totals=...)``); default this batch's own."""
    B = h.shape[0] // 2
    lp, valid = preference_token_logprobs_reference(h, w, b, t, m)
    n = valid.sum(-1).double()
    seq = lp.sum(-1) / (n if cfg.length_normalize else 1.0)
    c, r = seq[:B], seq[B:]
    if cfg.use_reference:
        k = n if cfg.length_normalize else torch.ones_like(n)
        c, r = c - ref_c.double() / k[:B], r - ref_r.double() / k[B:]
    beta, eps, gam = cfg.beta, cfg.label_smoothing, cfg.gamma
    sig = lambda x: 1.0 / (1.0 + torch.exp(-x))  # noqa: E731
    if cfg.loss_type == "sigmoid":      # DPO / cDPO (Mitchell 2023) / SimPO (Meng et al. 2024)
        zz = beta * (c - r) - gam
        per = -(1 - eps) * torch.log(sig(zz)) - eps * torch.log(sig(-zz))
    elif cfg.loss_type == "robust":     # Chowdhury et al. 2024
        zz = beta * (c - r) - gam
        per = ((1 - eps) * -torch.log(sig(zz)) - eps * -torch.log(sig(-zz))) / (1 - 2 * eps)
    elif cfg.loss_type == "hinge":      # SLiC-HF
        per = torch.clamp(1 - (beta * (c - r) - gam), min=0)
    elif cfg.loss_type == "ipo":        # Azar et al. 2023, Eq. 17
        per = (c - r - 1 / (2 * beta)) ** 2
    else:                               # ORPO (Hong et al. 2024), Eqs. 4 and 7
        odds = lambda s: torch.exp(s) / (1 - torch.exp(s))  # noqa: E731
        per = -beta * torch.log(sig(torch.log(odds(c) / odds(r))))
    n_pairs = B if n_pairs is None else n_pairs
    n_tok = valid[:B].sum() if n_chosen_tokens is None else n_chosen_tokens
    nll = -lp[:B].sum() / n_tok
    return per.sum() / n_pairs + cfg.nll_coef * nll
