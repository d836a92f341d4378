"""The benchmark problems: inputs for each op, the loss each op computes, and a float64 reference.

Every op is a function of the per-token log-probs ``logp[b, t] = log softmax(hidden @ weight.T)[target]``
(temperature 1, no bias, no softcap):

* ``logprobs``: the per-token log-probs themselves; the backward of the objective ``sum(logp * g)`` with a
  fixed random upstream gradient ``g`` (not all ones, so a wrong row scaling shows).
* ``sft``: token-mean negative log-likelihood over the loss mask (``F.cross_entropy`` with ignore_index).
* ``grpo``: the clipped policy-gradient loss of GRPO with given per-sequence advantages and old
  log-probs, eps_low = eps_high = 0.2, no KL term (beta = 0), aggregated as TRL / Liger ``loss_type="grpo"``:
  the mean over sequences of the token mean within each sequence.
* ``hpt``: a mixed batch: rows flagged ``is_demo`` take the SFT loss (token mean over the demo rows), the
  other rows the GRPO loss above (mean over the RL rows); ``loss = L_RL + L_SFT``.

The eager baselines compute exactly these formulas from materialized logits; the float64 reference
computes them in float64, chunked over the tokens so the N x V logits never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .shapes import Shape, layout

OPS = ("logprobs", "sft", "grpo", "hpt")
IGNORE_INDEX = -100
EPS_LOW = 0.2
EPS_HIGH = 0.2
OLD_LOGP_NOISE = 0.1      # old = logp + N(0, 0.1^2): ratios near 1, a few tokens clipped
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Inputs:
    """One input set. ``hidden`` [B, T, H] and ``weight`` [V, H] are leaves that require grad."""
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor        # [B, T] int64, every id valid (in [0, V))
    mask: torch.Tensor           # [B, T] float32, 1 = the token counts in the loss
    advantages: torch.Tensor     # [B] float32
    old_logprobs: torch.Tensor   # [B, T] float32
    is_demo: torch.Tensor        # [B] bool
    grad_out: torch.Tensor       # [B, T] float32, upstream gradient of the logprobs op
    group_size: int
    extra: dict = field(default_factory=dict)

    @property
    def targets_ce(self) -> torch.Tensor:
        """Targets with ``IGNORE_INDEX`` where the mask is 0 (the cross-entropy convention)."""
        if "targets_ce" not in self.extra:
            self.extra["targets_ce"] = torch.where(self.mask > 0, self.targets,
                                                   torch.full_like(self.targets, IGNORE_INDEX))
        return self.extra["targets_ce"]

    def nbytes(self) -> int:
        tensors = [self.hidden, self.weight, self.targets, self.mask, self.advantages,
                   self.old_logprobs, self.is_demo, self.grad_out]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Problem:
    op: str
    shape: Shape
    dtype: str
    B: int
    T: int
    G: int
    zero_adv_frac: float = 0.0   # fraction of the groups whose advantages are exactly 0 (equal rewards)

    @property
    def N(self) -> int:
        return self.B * self.T


def make_problem(op: str, shape: Shape, dtype: str, seq_len: int | None = None,
                 group_size: int = 8, zero_adv_frac: float = 0.0) -> Problem:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not 0.0 <= zero_adv_frac <= 1.0:
        raise ValueError(f"zero_adv_frac must be in [0, 1], got {zero_adv_frac}")
    B, T, G = layout(shape.N, seq_len, group_size)
    return Problem(op, shape, dtype, B, T, G, zero_adv_frac)


@torch.no_grad()
def chunked_logprobs(h2: torch.Tensor, W: torch.Tensor, y: torch.Tensor, acc=torch.float32,
                     budget_bytes: float = 1.0e9) -> torch.Tensor:
    """log softmax(h2 @ W.T)[y] for [n, H] rows, chunked over rows; matmul in the inputs' dtype,
    the softmax in ``acc``."""
    n, V = h2.shape[0], W.shape[0]
    out = torch.empty(n, dtype=acc, device=h2.device)
    c = _chunk_rows(n, V, 3 * torch.finfo(acc).bits // 8, budget_bytes)
    for s in range(0, n, c):
        z = (h2[s:s + c] @ W.T).to(acc)
        out[s:s + c] = z.gather(1, y[s:s + c, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    return out


def _chunk_rows(n: int, V: int, bytes_per_elem: int, budget: float) -> int:
    return int(max(1, min(n, budget // max(1, V * bytes_per_elem))))


def make_inputs(p: Problem, device: torch.device | str, seed: int = 0) -> Inputs:
    """Random inputs for ``p`` (never zeros): hidden ~ N(0, 1), weight ~ N(0, (2/sqrt(H))^2) so the
    logits spread like a real lm_head's (std about 2); prompt and padding positions masked out;
    per-sequence 0/1 rewards turned into group-normalized advantages; old log-probs near the current."""
    dev = torch.device(device)
    dt = DTYPES[p.dtype]
    H, V = p.shape.H, p.shape.V
    B, T, G = p.B, p.T, p.G
    gen = torch.Generator(device=dev)
    gen.manual_seed(1_000_003 * seed + 17)

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=gen, device=dev, dtype=torch.float32) * std)

    hidden = randn(B, T, H).to(dt).requires_grad_(True)
    weight = randn(V, H, std=2.0 / H ** 0.5).to(dt).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=gen, device=dev)
    # mask: a prompt of 0..T/4 tokens at the start, a padded tail of 0..T/8 tokens at the end
    pos = torch.arange(T, device=dev)
    start = torch.randint(0, max(1, T // 4 + 1), (B, 1), generator=gen, device=dev)
    end = T - torch.randint(0, max(1, T // 8 + 1), (B, 1), generator=gen, device=dev)
    mask = ((pos >= start) & (pos < end)).float()
    # at least one counted token per row
    mask[:, -1] = torch.where(mask.sum(1) == 0, torch.ones_like(mask[:, -1]), mask[:, -1])
    rewards = (torch.rand(B, generator=gen, device=dev) < 0.5).float().view(-1, G)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
           if G > 1 else rewards - 0.5)
    n_zero = int(round(p.zero_adv_frac * adv.shape[0]))   # groups with equal rewards: advantage 0
    adv[:n_zero] = 0.0
    advantages = adv.reshape(B).contiguous()
    cur = chunked_logprobs(hidden.detach().reshape(-1, H), weight.detach(), targets.reshape(-1))
    old = (cur + randn(B * T, std=OLD_LOGP_NOISE)).reshape(B, T)
    groups = B // G
    if groups >= 2:
        is_demo = (torch.arange(B, device=dev) // G) % 2 == 1
    else:
        is_demo = torch.arange(B, device=dev) >= (B + 1) // 2
    grad_out = randn(B, T)
    return Inputs(hidden, weight, targets, mask, advantages, old, is_demo, grad_out, G)


# ----------------------------------------------------------------------------- the losses
def grpo_loss(logp, old, adv, mask, rows=None):
    """Clipped GRPO loss, beta = 0, seq_mean_token_mean aggregation (Liger / TRL loss_type="grpo"):
    the mean over sequences (over the ``rows`` flagged True, when given) of each one's token mean."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old.to(logp.dtype))
    a = adv.to(logp.dtype)[:, None]
    per_tok = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
    per_seq = (per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)
    if rows is None:
        return per_seq.mean()
    w = rows.to(logp.dtype)
    return (per_seq * w).sum() / w.sum().clamp(min=1)


def sft_loss(logp, mask, rows=None):
    """Token-mean NLL over the mask (over the ``rows`` flagged True, when given)."""
    m = mask.to(logp.dtype)
    if rows is not None:
        m = m * rows.to(logp.dtype)[:, None]
    return -(logp * m).sum() / m.sum().clamp(min=1)


def loss_from_logp(op: str, logp: torch.Tensor, x: Inputs) -> torch.Tensor:
    """The op's scalar objective from per-token log-probs ``logp`` [B, T] (no data-dependent
    branches or shapes, so torch.compile sees one graph)."""
    if op == "logprobs":
        return (logp * x.grad_out.to(logp.dtype)).sum()
    if op == "sft":
        return sft_loss(logp, x.mask)
    if op == "grpo":
        return grpo_loss(logp, x.old_logprobs, x.advantages, x.mask)
    if op == "hpt":
        # L_RL over the rollout rows + L_SFT over the demo rows (a part with no rows is 0)
        return (grpo_loss(logp, x.old_logprobs, x.advantages, x.mask, rows=~x.is_demo)
                + sft_loss(logp, x.mask, rows=x.is_demo))
    raise ValueError(op)


# ----------------------------------------------------------------------------- float64 reference
def reference(op: str, x: Inputs, budget_bytes: float = 1.5e9) -> dict:
    """float64 reference over the FULL batch, chunked over tokens (bounded memory).

    Returns ``out`` (the scalar loss, or the [B, T] log-probs for ``logprobs``) and the gradients
    ``dhidden`` [B, T, H] and ``dweight`` [V, H] of the op's objective, all float64."""
    B, T, H = x.hidden.shape
    V = x.weight.shape[0]
    h = x.hidden.detach().reshape(-1, H).double()
    W = x.weight.detach().double()
    y = x.targets.reshape(-1)
    n = h.shape[0]
    logp = chunked_logprobs(h, W, y, acc=torch.float64, budget_bytes=budget_bytes)
    lp = logp.view(B, T).clone().requires_grad_(True)
    with torch.enable_grad():
        obj = loss_from_logp(op, lp, x)
        (g,) = torch.autograd.grad(obj, lp)
    g = g.reshape(-1)
    dh = torch.empty_like(h)
    dW = torch.zeros_like(W)
    c = _chunk_rows(n, V, 8 * 3, budget_bytes)
    with torch.no_grad():
        for s in range(0, n, c):
            hs = h[s:s + c]
            dz = torch.softmax(hs @ W.T, dim=1)
            dz.mul_(-g[s:s + c, None])
            dz.scatter_add_(1, y[s:s + c, None], g[s:s + c, None])
            dh[s:s + c] = dz @ W
            dW.addmm_(dz.T, hs)
    out = logp.view(B, T) if op == "logprobs" else obj.detach()
    return {"out": out, "dhidden": dh.view(B, T, H), "dweight": dW}


def rel_err(a: torch.Tensor | None, ref: torch.Tensor) -> float | None:
    """``||a - ref|| / ||ref||`` in float64 for tensors; for a scalar loss ``|a - ref| / max(|ref|, 1)``
    (a GRPO loss sits near 0, where a plain relative error means nothing). NaN if ``a`` has NaN/inf."""
    if a is None:
        return None
    a = a.detach().reshape(ref.shape).to(ref.device, torch.float64)
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    num = torch.linalg.vector_norm(a - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if ref.numel() == 1:
        return num / max(den, 1.0)
    return num / den if den > 0 else num
