"""What one training row is made of, and the per-sample maths of the RL steps.

* ``Sample``: one (prompt, completion) row of a step, replacing positional tuples.
* DAPO (Yu et al. 2025, arXiv:2503.14476): ``keep_informative_groups`` (dynamic sampling, Sec. 3.2),
  ``soft_overlong_punishment`` (eq. 13).
* Process rewards: ``step_ends`` (token index where each reasoning step ends) and
  ``process_advantages`` (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300, Sec. 4.1.3 "process
  supervision", the reward model scheme of Math-Shepherd, Wang et al. 2024, arXiv:2312.08935).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union


@dataclass
class Sample:
    """One row of a training step.

    Attributes:
        prompt_ids: the prompt's token ids (not trained).
        completion_ids: the trained token ids (EOS included when there is one).
        is_demo: an SFT demonstration row inside an RL batch (HPT).
        advantage: one float for the whole completion, or one per completion token (process rewards).
        logprobs: the sampler's log-prob of each completion token, or None.
        trainable: False = the row is in the batch but its loss mask is zero (DAPO overlong filtering).
    """

    prompt_ids: list
    completion_ids: list
    is_demo: bool = False
    advantage: Union[float, list] = 0.0
    logprobs: Optional[list] = None
    trainable: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


# ---------------------------------------------------------------------------------------- DAPO
def soft_overlong_punishment(length: int, max_len: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO eq. 13: 0 up to ``max_len - buffer`` tokens, then a linear ramp to ``-penalty`` at ``max_len``.

    R(y) = 0                              if |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
         = -1                             if |y| > L_max          (times ``penalty``)
    """
    if buffer <= 0:
        return 0.0
    free = max_len - buffer
    if length <= free:
        return 0.0
    if length > max_len:
        return -float(penalty)
    return float(penalty) * (free - length) / buffer


def keep_informative_groups(rewards: Sequence[float], n: int) -> list[int]:
    """Indices of the groups of ``n`` consecutive rewards that are not all equal (DAPO dynamic sampling:
    a group whose completions all score the same has all-zero group advantages and no gradient)."""
    if n <= 0 or len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards cannot be split into groups of n={n}")
    keep = []
    for g in range(len(rewards) // n):
        grp = rewards[g * n:(g + 1) * n]
        if max(grp) - min(grp) > 1e-12:
            keep.append(g)
    return keep


# ------------------------------------------------------------------------------ process rewards
def step_ends(token_texts: Sequence[str], delimiter: str = "\n", token_ids: Optional[Sequence[int]] = None,
              step_token_id: Optional[int] = None) -> list[int]:
    """Index of the last token of each reasoning step of one completion.

    With ``step_token_id`` a step ends at each occurrence of that token (exact). Otherwise the
    completion's text (the concatenation of ``token_texts``) is split after each ``delimiter``; a step
    ends at the token holding the delimiter's last character. The text after the last delimiter is a
    step too when it is not blank; the final step always ends at the last token.
    """
    T = len(token_texts) if token_ids is None else len(token_ids)
    if T == 0:
        return []
    ends = []
    if step_token_id is not None:
        ends = [t for t, i in enumerate(token_ids) if i == step_token_id]
        tail_blank = bool(ends) and ends[-1] == T - 1
    else:
        if not delimiter:
            raise ValueError("reward.step_delimiter is empty: give a delimiter text or reward.step_token")
        text = "".join(token_texts)
        stop = []  # token index of each character
        for t, s in enumerate(token_texts):
            stop += [t] * len(s)
        pos = text.find(delimiter)
        while pos >= 0:
            ends.append(stop[pos + len(delimiter) - 1])
            pos = text.find(delimiter, pos + len(delimiter))
        ends = sorted(set(ends))
        tail = text[text.rfind(delimiter) + len(delimiter):] if ends else text
        tail_blank = bool(ends) and not tail.strip()
    if not ends or not tail_blank:
        ends.append(T - 1)
    if ends[-1] != T - 1:  # trailing tokens (EOS, blanks) belong to the last step
        ends[-1] = T - 1
    return ends


def process_advantages(scores: Sequence[Sequence[float]], ends: Sequence[Sequence[int]],
                       lengths: Sequence[int], group_size: int, eps: float = 1e-6) -> list[list[float]]:
    """Per-token advantages from per-step rewards (DeepSeekMath Sec. 4.1.3, process supervision).

    For a group of ``group_size`` completions, every step reward r_k of every completion is normalised
    with the mean and std of all step rewards of the group, r~ = (r - mean) / (std + eps); the advantage
    of token t is the sum of the normalised rewards of the steps that end at or after t:
    A_t = sum_{k: end_k >= t} r~_k. A completion with one step (an outcome reward) gets its normalised
    reward on every token, which is GRPO's outcome supervision when each completion has one step.

    ``scores[i]`` / ``ends[i]``: the step rewards of completion i and the token index where each ends
    (increasing, < lengths[i]); returns one list of ``lengths[i]`` floats per completion.
    """
    N = len(scores)
    if len(ends) != N or len(lengths) != N:
        raise ValueError(f"process_advantages: {N} score lists, {len(ends)} step-end lists, {len(lengths)} lengths")
    if group_size <= 0 or N % group_size:
        raise ValueError(f"{N} completions cannot be split into groups of {group_size}")
    out: list[list[float]] = []
    for g in range(0, N, group_size):
        flat = [float(x) for i in range(g, g + group_size) for x in scores[i]]
        mean = sum(flat) / len(flat) if flat else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)) if len(flat) > 1 else 0.0
        for i in range(g, g + group_size):
            if len(scores[i]) != len(ends[i]):
                raise ValueError(f"completion {i}: {len(scores[i])} step rewards for {len(ends[i])} steps")
            adv = [0.0] * lengths[i]
            for r, e in zip(scores[i], ends[i]):
                if not 0 <= e < lengths[i]:
                    raise ValueError(f"completion {i}: step end {e} outside its {lengths[i]} tokens")
                z = (float(r) - mean) / (std + eps)
                for t in range(e + 1):
                    adv[t] += z
            out.append(adv)
    return out
