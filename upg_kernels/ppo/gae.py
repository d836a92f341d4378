"""Generalized advantage estimation (Schulman et al. 2016) and masked whitening, vectorized.

Masked positions are skipped, not zero-filled: each row is the sequence of its valid tokens (left or
right padding, or holes such as tool outputs), the value after the row's last valid token is 0 (the
episode ends there), and outputs are 0 at masked positions. On valid positions this is verl's
``compute_gae_advantage_return`` (it carries ``nextvalues`` / ``lastgaelam`` across masked tokens).

Method: both recurrences (the next valid value, and ``A_t = delta_t + gamma lam A_next``) are
first-order linear recurrences ``x_t = a_t x_{t+1} + b_t`` with ``x_T = 0``. A masked position is the
identity step ``a = 1, b = 0``. :func:`reverse_linear_scan` solves one with ``ceil(log2 T)``
vectorized doubling steps (Hillis-Steele scan of the affine maps ``x -> a x + b``; composing two is
``(a1 a2, b1 + a1 b2)``); no Python loop over tokens, no ``T x T`` matrix, and no ``(gamma lam)^-t``
factors that overflow: every product is of factors in [0, 1].
"""
from __future__ import annotations

import torch


def reverse_linear_scan(a, b):
    """``x [B, T]`` with ``x_t = a_t x_{t+1} + b_t`` and ``x_T = 0`` (doubling scan, log2(T) steps)."""
    A, X = a, b
    T = b.shape[-1]
    d = 1
    while d < T:
        pad = X.new_zeros(X.shape[:-1] + (d,))
        X = X + A * torch.cat([X[..., d:], pad], dim=-1)   # beyond T: x = 0
        A = A * torch.cat([A[..., d:], pad], dim=-1)
        d *= 2
    return X


def _float_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def check_bt(name, t, shape=None):
    """TypeError / ValueError naming ``name`` unless ``t`` is a ``[B, T]`` tensor (of ``shape``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {list(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_mask(mask, shape):
    """A ``[B, T]`` mask of ``shape``: bool, or numbers that are all 0 or 1."""
    check_bt("mask", mask, shape)
    if mask.dtype.is_floating_point and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be boolean (or 0/1)")
    return mask.bool()


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """``(advantages, returns)`` ``[B, T]`` by GAE over each row's valid tokens.

    ``delta_t = r_t + gamma V_next(t) - V_t``, ``A_t = delta_t + gamma lam A_next(t)``, ``R_t = A_t + V_t``,
    where ``next(t)`` is the row's next valid position (none after the last: ``V = A = 0``).
    ``rewards`` / ``values`` at masked positions are ignored (may be NaN); outputs are 0 there.
    Computed without gradient in float32 (float64 if an input is), returned detached."""
    check_bt("rewards", rewards)
    check_bt("values", values, rewards.shape)
    m = check_mask(mask, rewards.shape)
    for name, v in (("gamma", gamma), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    dt = _float_dtype(rewards, values)
    with torch.no_grad():
        mf = m.to(dt)
        zero = torch.zeros((), dtype=dt, device=rewards.device)
        r = torch.where(m, rewards.to(dt), zero)
        v = torch.where(m, values.to(dt), zero)
        first_value_from = reverse_linear_scan(1.0 - mf, v)          # V at the first valid index >= t
        next_value = torch.cat([first_value_from[:, 1:], first_value_from[:, :1] * 0], dim=1)
        delta = r + gamma * next_value - v
        adv = reverse_linear_scan(mf * (gamma * lam) + (1.0 - mf), mf * delta)
        adv = torch.where(m, adv, zero)
        returns = torch.where(m, adv + v, zero)
    return adv, returns


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """``(x - mean) / sqrt(var + eps)`` over the valid positions (TRL's ``masked_whiten``: unbiased
    variance); ``shift_mean=False`` adds the mean back. 0 at masked positions. Needs >= 2 valid."""
    check_bt("x", x)
    m = check_mask(mask, x.shape)
    n = m.sum()
    if int(n) < 2:
        raise ValueError(f"whiten needs at least 2 valid positions in mask, got {int(n)}")
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xm = torch.where(m, x, zero)
    mean = xm.sum() / n
    var = (torch.where(m, x - mean, zero) ** 2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero)
