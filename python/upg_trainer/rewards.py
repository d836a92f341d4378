"""Reward functions: the math verifier, the embedded task's verifier and user functions.

Every reward function has TRL's signature::

    reward_func(prompts: list, completions: list[str], **columns) -> list[float | None]

``columns`` holds the dataset's other columns (``answer``, ``demonstration``, ...), one entry per
completion, and during RL also ``completion_ids`` (token ids), ``completion_length`` (tokens) and
``truncated`` (True when the completion hit ``rollout.max_new_tokens`` without an EOS). ``None``
means "not applicable" and counts as 0 in the sum.

Process rewards: a function may return, for a completion, a list of per-step scores instead of one
float (one score per reasoning step, see ``samples.step_ends``); ``grpo`` then trains on per-token
advantages (``samples.process_advantages``). The scalar of such a completion (logs, accuracy,
dynamic sampling, eval) is the mean of its step scores.

``rm:PATH`` loads a reward model written by ``upg-train rm`` (``value_model.RMReward``).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from typing import Callable, Optional

from .task import extract_boxed, task_reward

try:  # optional dependency
    import math_verify as _mv
except Exception:  # pragma: no cover - depends on the environment
    _mv = None

_NUM = re.compile(r"^[-+]?\d+(\.\d+)?$")


def _normalize(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    return s.rstrip(".")


def _fallback_equal(got: str, ref: str) -> bool:
    a, b = _normalize(got), _normalize(ref)
    if a == b:
        return True
    ca, cb = a.replace(",", ""), b.replace(",", "")
    if _NUM.match(ca) and _NUM.match(cb):
        return math.isclose(float(ca), float(cb), rel_tol=1e-9, abs_tol=1e-9)
    return False


def math_verify_answer(completion: str, answer: str, use_math_verify: Optional[bool] = None) -> float:
    """1.0 if the completion's last ``\\boxed{}`` answer equals ``answer``; math-verify when installed."""
    use = (_mv is not None) if use_math_verify is None else (use_math_verify and _mv is not None)
    got = extract_boxed(completion)
    if got is None:
        return 0.0
    if use:
        try:
            gold = _mv.parse(f"${answer}$" if "\\boxed" not in str(answer) else str(answer))
            pred = _mv.parse(f"\\boxed{{{got}}}")
            if gold and pred:
                return float(bool(_mv.verify(gold, pred)))
        except Exception:  # math-verify can time out or fail to parse: fall back
            pass
    return float(_fallback_equal(got, str(answer)))


def math_reward(prompts, completions, answer=None, **_):
    """TRL-signature math reward on the ``answer`` column."""
    if answer is None:
        raise ValueError("the 'math' reward needs an 'answer' column")
    return [math_verify_answer(c, a) for c, a in zip(completions, answer)]


BUILTIN: dict[str, Callable] = {"math": math_reward, "task": task_reward}


def load_reward(spec: str) -> Callable:
    """``'math'``, ``'task'``, ``'package.module:function'`` or ``'path/to/file.py:function'``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("rm:"):
        from .value_model import RMReward
        return RMReward(spec[3:])
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"reward function {spec!r}: use 'math', 'task', 'module:function' or 'file.py:function'")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            if not os.path.exists(mod_name):
                raise FileNotFoundError(f"no such file {mod_name!r}")
            s = importlib.util.spec_from_file_location(f"upg_user_reward_{abs(hash(mod_name))}", mod_name)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:
        raise ValueError(f"reward function {spec!r}: cannot import {mod_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


class RewardSet:
    """Calls each reward function, checks what it returned, and sums with weights."""

    def __init__(self, specs: list, weights: Optional[list] = None):
        if not specs:
            raise ValueError("reward.funcs is empty: give at least one reward function")
        self.names = [s if isinstance(s, str) else getattr(s, "__name__", "reward") for s in specs]
        self.funcs = [load_reward(s) if isinstance(s, str) else s for s in specs]
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(self.funcs)
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.funcs)} reward functions")

    def __call__(self, prompts: list, completions: list[str], columns: dict) -> tuple[list[float], dict]:
        """(summed rewards, {name: per-completion values}) for ``len(completions)`` completions."""
        n = len(completions)
        total = [0.0] * n
        per = {}
        for name, fn, w in zip(self.names, self.funcs, self.weights):
            try:
                out = fn(prompts, completions, **columns)
            except Exception as e:
                raise RuntimeError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            try:
                out = list(out)
            except TypeError:
                raise ValueError(f"reward function {name!r} returned {type(out).__name__}, "
                                 f"expected a list of {n} floats (or None)") from None
            if len(out) != n:
                raise ValueError(f"reward function {name!r} returned {len(out)} values for {n} completions")
            vals = []
            for i, v in enumerate(out):
                if v is None:
                    vals.append(None)
                    continue
                if isinstance(v, (list, tuple)):  # process reward: one score per step
                    steps = [_number(name, x, i) for x in v]
                    if not steps:
                        raise ValueError(f"reward function {name!r} returned an empty step list at index {i}")
                    vals.append(steps)
                    total[i] += w * sum(steps) / len(steps)
                    continue
                fv = _number(name, v, i)
                vals.append(fv)
                total[i] += w * fv
            per[name] = vals
        return total, per

    def step_scores(self, per: dict, n: int) -> Optional[list[list[tuple[float, bool]]]]:
        """Process mode: per completion, the weighted scores ``(w * score, is_step_list)`` of every function
        (a scalar counts as one step ending at the last token); None when no function returned a list."""
        if not any(isinstance(v, list) for vals in per.values() for v in vals):
            return None
        out = [[] for _ in range(n)]
        for name, w in zip(self.names, self.weights):
            for i, v in enumerate(per[name]):
                if isinstance(v, list):
                    out[i].append(([w * x for x in v], True))
                elif v is not None:
                    out[i].append(([w * v], False))
        return out


def _number(name: str, v, i: int) -> float:
    try:
        fv = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"reward function {name!r} returned {v!r} at index {i}: "
                         "not a number, a list of step scores or None") from None
    if not math.isfinite(fv):
        raise ValueError(f"reward function {name!r} returned non-finite {fv} at index {i}")
    return fv
