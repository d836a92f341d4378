"""Test doubles shared by the trainer's step tests: scripted rollout engines and a spy on the policy loss.

Import them in a test module (``from trainer_fakes import AnswerEngine, ScriptedEngine, spy``); ``spy``
is a pytest fixture."""
from __future__ import annotations

import pytest

import upg_trainer.trainer as trainer_mod
from upg_trainer.rollout import Rollout


class ScriptedEngine:
    """Completions by a script: ``script(prompt_number, j) -> (text, finish_reason)``, where
    ``prompt_number`` counts the prompts over the engine's life; EOS ends a "stop" completion. Records
    the number of prompts of each generate call in ``calls``."""

    def __init__(self, tr, script=None):
        self.tr, self.script, self.calls, self.k = tr, script, [], 0

    def completion(self, i: int, prompt_ids: list, j: int) -> tuple[str, str]:
        return self.script(self.k, j)

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        self.calls.append(len(prompts))
        tok, out = self.tr.tok, []
        for i, p in enumerate(prompts):
            for j in range(n):
                text, fin = self.completion(i, p, j)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                ids = ids + ([tok.eos_token_id] if fin == "stop" else [])
                out.append(Rollout(list(p), ids, [-1.0] * len(ids), fin, i))
            self.k += 1
        return out

    def sync_weights(self, model):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


class AnswerEngine(ScriptedEngine):
    """Prompt i of a generate call gets ``correct[i]`` right answers (``\\boxed{answer}``) out of n, then
    wrong ones (answer + 1)."""

    def __init__(self, tr, correct):
        super().__init__(tr)
        self.correct = correct

    def completion(self, i, prompt_ids, j):
        by_ids = {tuple(self.tr.prompt_ids(r)): r for r in self.tr.train_rows}
        ans = int(by_ids[tuple(prompt_ids)]["answer"])
        return f"\\boxed{{{ans if j < self.correct[i] else ans + 1}}}", "stop"


@pytest.fixture
def spy(monkeypatch):
    """Every ``unified_policy_loss`` call of the trainer: its keyword arguments, hidden, weight, targets
    and its output (``out``)."""
    calls = []
    real = trainer_mod.unified_policy_loss

    def wrapped(hidden, weight, targets, **kw):
        res = real(hidden, weight, targets, **kw)
        calls.append(dict(kw, hidden=hidden, weight=weight, targets=targets, out=res))
        return res
    monkeypatch.setattr(trainer_mod, "unified_policy_loss", wrapped)
    return calls
