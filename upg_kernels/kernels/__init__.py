"""Vocabulary-sized work: per-token log-prob / entropy forward and the logits-recompute backward.

Every backend implements the same two host functions over flat inputs:

``forward(hidden [N,H], weight [V,H], bias [V]|None, targets [N] int64, params)``
    -> ``(logp [N] f32, entropy [N] f32, lse [N] f32)``

``backward(hidden, weight, bias, targets, lse, entropy, g_logp [N] f32, g_ent [N] f32|None, params,
           need_hidden, need_weight, need_bias)``
    -> ``(dhidden [N,H] | None, dweight [V,H] | None, dbias [V] | None)`` in the inputs' dtypes.

with ``z = softcap(hidden @ weight.T + bias) / temperature``, ``lse = logsumexp(z)``,
``logp = z[target] - lse`` and ``entropy = lse - sum(p * z)``. Rows whose target is
``ignore_index`` give 0 for all three and get no gradient. The backward forms
``dz = g_logp * (onehot - p) - g_ent * p * (log p + H)`` (then ``/ temperature`` and the softcap
chain rule), and skips rows whose ``g_logp`` and ``g_ent`` are both 0 exactly.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogprobParams:
    temperature: float = 1.0
    ignore_index: int = -100
    softcap: float = 0.0        # 0 = no final-logit softcapping
    filter_eps: float = 0.0     # backward tile filter (Triton only); 0 = exact


def get_backend(name: str):
    """The module implementing ``forward``/``backward`` for backend ``name``."""
    if name == "torch":
        from . import torch_chunked
        return torch_chunked
    if name == "triton":
        from . import triton_logprobs
        return triton_logprobs
    raise ValueError(f"unknown backend {name!r}")


# Every module holding @triton.jit kernels, each with an ``aot_variants()`` (kernels/aot.py): the
# ahead-of-time compile check (python -m upg_kernels.aot_check) builds all of them. A module listed
# here that fails to import, or lacks aot_variants(), is an error of the check, never skipped.
TRITON_KERNEL_MODULES = (
    "triton_logprobs_fwd",
    "triton_logprobs_bwd",
    "triton_epilogue",
)
