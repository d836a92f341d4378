"""Preference data of the two pairwise methods, ``upg-train dpo`` and ``upg-train rm`` (their steps:
``methods/dpo.py``, ``methods/rm.py``).

Data: TRL's explicit-prompt preference format, one row per pair with ``prompt`` (a string or chat
messages), ``chosen`` and ``rejected`` (strings, or lists of assistant messages whose contents are
joined); column names are ``data.prompt_column`` / ``data.chosen_column`` / ``data.rejected_column``.
``data.path = embedded``: the embedded task with chosen = the worked solution and rejected = the same
with a wrong result (``task.add_preference_pairs``).

* dpo: rows ``[chosen..., rejected...]`` of one batch go through ``upg_kernels.preference_loss``
  (hidden states + lm_head weight; the sequence log-probs come from the fused kernel), the
  reference log-prob sums from the frozen reference (the initial policy, i.e. the SFT checkpoint
  given as model.path, or model.ref_path) through ``upg_kernels.sequence_logprobs``.
* rm: a scalar head on the trunk (``value_model.ScalarHeadModel``); r = the head at the last token of
  prompt + completion; ``upg_kernels.pairwise_reward_loss`` (Bradley-Terry).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data import check_columns, load_rows


def completion_text(x, column: str, i: int, path: str) -> str:
    """A chosen/rejected entry as text, or a clear error (empty, or neither a string nor messages)."""
    if isinstance(x, str):
        text = x
    elif isinstance(x, list) and x and all(isinstance(m, dict) and "content" in m for m in x):
        text = "".join(str(m["content"]) for m in x if m.get("role", "assistant") == "assistant")
    else:
        raise ValueError(f"preference dataset {path!r} row {i}: column {column!r} must be a string or a list "
                         f"of chat messages, got {type(x).__name__}: {x!r:.80}")
    if not text.strip():
        raise ValueError(f"preference dataset {path!r} row {i}: column {column!r} is empty (every pair needs a "
                         "non-empty chosen and rejected completion)")
    return text


def check_preference_rows(rows: list[dict], d, path: str) -> None:
    cols = [d.prompt_column, d.chosen_column, d.rejected_column]
    check_columns(rows, cols, path, "preference training (prompt/chosen/rejected)")
    for i, r in enumerate(rows):
        for col in cols[1:]:
            completion_text(r[col], col, i, path)


def load_preference_rows(cfg) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) of an rm/dpo run."""
    from .task import add_preference_pairs
    d, seed = cfg.data, cfg.train.seed
    if d.path == "embedded":
        train = add_preference_pairs(load_rows("embedded", num=d.num_train, seed=seed, levels=d.levels), seed)
        held = add_preference_pairs(load_rows("embedded", num=d.num_eval, seed=seed, levels=d.eval_levels,
                                              eval_set=True), seed + 1)
        return train, held
    rows = load_rows(d.path, split=d.split)
    check_preference_rows(rows, d, d.path)
    if d.eval_path and d.eval_path != "auto":
        held = load_rows(d.eval_path, split=d.eval_split, num=d.num_eval)
        check_preference_rows(held, d, d.eval_path)
        return rows, held
    if d.eval_fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(f"upg-pref-split-{seed}").shuffle(order)
    k = max(1, int(len(rows) * d.eval_fraction))
    held = [rows[i] for i in sorted(order[:k])][:d.num_eval]
    return [rows[i] for i in sorted(order[k:])], held


@dataclass
class SeqBatch:
    """Right-padded prompt+completion sequences of 2B rows (chosen, then rejected) for the reward model."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor

    def to(self, device):
        return SeqBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                  self.last)))
