"""The rollout interface: one engine API for transformers ``generate`` and vLLM.

An engine turns token-id prompts into sampled completions. Results are grouped by prompt:
for ``generate(prompts, n=...)`` the returned list has ``len(prompts) * n`` items and item
``i * n + j`` is the j-th completion of prompt ``i``.

Engines are colocated with the trainer: between rollout phases the trainer calls ``sleep()``
(free the engine's memory, e.g. vLLM's KV cache) and ``wake()`` before the next ``generate``;
after each optimizer step it calls ``sync_weights(model)`` so the sampler follows the policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch


@dataclass
class Rollout:
    """One sampled completion of one prompt.

    Attributes:
        prompt_ids: the prompt's token ids (as given to ``generate``).
        completion_ids: the sampled token ids, EOS included when it was sampled, no padding.
        logprobs: the sampler's log-prob of each completion token (same length as
            ``completion_ids``), under the sampling temperature (logits / T, before top-p
            truncation; T = 1 for greedy), or None when the engine cannot report them (or was built
            not to, e.g. ``HFEngine(..., return_logprobs=False)``).
        finish_reason: ``"stop"`` (EOS or a stop token) or ``"length"`` (hit ``max_new_tokens``).
        prompt_index: index of the prompt in the ``generate`` call.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: Optional[list[float]] = None
    finish_reason: str = "length"
    prompt_index: int = 0
    extra: dict = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a sampler."""

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> list[Rollout]:
        """Sample ``n`` completions per prompt; return ``len(prompts) * n`` rollouts grouped by prompt.

        ``temperature == 0`` means greedy decoding (used for evaluation); sampler log-probs are
        then those of the untempered distribution. ``seed`` makes sampling reproducible and must
        not disturb the caller's global RNG state.
        """
        ...

    def sync_weights(self, model) -> None:
        """Make the sampler use ``model``'s current weights (called after each optimizer step)."""
        ...

    def sleep(self) -> None:
        """Release sampler memory between rollout phases (no-op where not applicable)."""
        ...

    def wake(self) -> None:
        """Undo ``sleep()`` before the next ``generate``."""
        ...


def group(rollouts: list[Rollout], n: int) -> list[list[Rollout]]:
    """Split a flat, prompt-grouped rollout list into per-prompt groups of ``n``."""
    if n <= 0 or len(rollouts) % n:
        raise ValueError(f"{len(rollouts)} rollouts cannot be split into groups of {n}")
    return [rollouts[i:i + n] for i in range(0, len(rollouts), n)]


def logprob_mismatch(trainer_logprobs, sampler_logprobs, loss_mask, is_demo=None) -> dict:
    """``{"sampler_logprob_absdiff": mean |trainer - sampler| log-prob}`` over the RL tokens in the loss
    (``loss_mask > 0``, demonstration rows excluded): how far the rollout engine's log-probs are from
    the trainer's on the same tokens and weights (0 up to rounding when both compute the same thing)."""
    m = loss_mask > 0
    if is_demo is not None:
        m = m & ~is_demo.to(torch.bool)[:, None]
    d = (trainer_logprobs.float() - sampler_logprobs.to(trainer_logprobs.device).float()).abs()
    n = m.sum()
    return {"sampler_logprob_absdiff": float(torch.where(m, d, torch.zeros_like(d)).sum() / n.clamp(min=1))}
