"""Datasets, chat-template tokenization and batch building.

Rows are dicts with a prompt column (a string, or a list of chat messages), an answer column
(RL rewards, HPT gating, eval) and a demonstration column (SFT, HPT demonstrations).

Two batch layouts:

* ``build_rows``: one sequence per row, prompts left-padded to a common length and completions
  right-padded, so every completion starts at the same column. Position ids count real tokens
  only. Used for rollouts, HPT's demonstration rows and unpacked SFT.
* ``pack_rows``: SFT packing. Several (prompt, completion) samples share one row; position ids
  restart at 0 for each sample and a block-diagonal causal 4D mask stops any sample attending to
  another, so a packed row gives the same per-token log-probs as the samples run alone.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from . import task as task_mod

EVAL_SEED_OFFSET = 7919  # the embedded held-out set uses a different generator stream


# ----------------------------------------------------------------------------------- loading
def load_rows(path: str, *, split: str = "train", num: Optional[int] = None, seed: int = 0,
              levels=(1, 2, 3), eval_set: bool = False) -> list[dict]:
    """Rows of a dataset: 'embedded', a .jsonl/.json/.parquet file, or a save_to_disk directory."""
    if path == "embedded":
        n = 20000 if num is None else num
        return task_mod.make_dataset(n, seed=seed + (EVAL_SEED_OFFSET if eval_set else 0), levels=levels)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {path!r} not found (give a local .jsonl/.json/.parquet file, "
                                "a datasets save_to_disk directory, or 'embedded')")
    if os.path.isdir(path):
        import datasets
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise ValueError(f"dataset directory {path!r} is not a datasets save_to_disk directory: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {path!r} has no split {split!r}; splits: {list(ds)}")
            ds = ds[split]
        rows = ds.to_list()
    elif path.endswith(".jsonl") or path.endswith(".json"):
        rows = []
        with open(path) as f:
            if path.endswith(".json"):
                data = json.load(f)
                rows = data if isinstance(data, list) else data.get(split, data.get("data"))
                if rows is None and isinstance(data, dict) and data and all(isinstance(v, list)
                                                                            for v in data.values()):
                    rows = _columnar(data, path)
                if not isinstance(rows, list):
                    raise ValueError(f"{path!r}: expected a JSON list of objects")
            else:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path!r} line {i} is not valid JSON: {e}") from e
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"dataset {path!r}: unsupported format (use .jsonl, .json, .parquet or a directory)")
    if num is not None and num > 0:
        rows = rows[:num]
    return rows


def _columnar(data: dict, path: str) -> list[dict]:
    """Rows of a column-oriented JSON object ``{"prompt": [...], "chosen": [...], ...}``."""
    lens = {k: len(v) for k, v in data.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"{path!r}: column lengths differ (length mismatch): {lens}; every column needs one "
                         "entry per row")
    n = next(iter(lens.values()))
    return [{k: data[k][i] for k in data} for i in range(n)]


def check_columns(rows: list[dict], columns: list[str], path: str, purpose: str) -> None:
    if not rows:
        raise ValueError(f"dataset {path!r} is empty: {purpose} needs at least one row")
    have = set(rows[0])
    for c in columns:
        if c not in have:
            raise ValueError(f"dataset {path!r} has no column {c!r} (needed for {purpose}); "
                             f"columns: {sorted(have)}. Rename it or set the data.*_column option.")
        for i, r in enumerate(rows):
            if r.get(c) is None:
                raise ValueError(f"dataset {path!r} row {i}: column {c!r} is missing or null")


# ------------------------------------------------------------------------------ tokenization
def prompt_messages(prompt, system_prompt: str = "") -> list[dict]:
    if isinstance(prompt, list):
        msgs = list(prompt)
    else:
        msgs = [{"role": "user", "content": str(prompt)}]
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def encode_prompt(tokenizer, prompt, system_prompt: str = "") -> list[int]:
    """Prompt token ids through the chat template (plain text when the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(prompt_messages(prompt, system_prompt),
                                            add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return list(tokenizer(text)["input_ids"])


def encode_completion(tokenizer, text: str, max_tokens: Optional[int] = None) -> list[int]:
    """Completion ids + EOS (the EOS is trained so the model learns to stop)."""
    ids = list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max(0, max_tokens - 1)]
    return ids + [tokenizer.eos_token_id]


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)


# ----------------------------------------------------------------------------------- batches
@dataclass
class RowBatch:
    input_ids: torch.Tensor        # [B, T]
    attention_mask: Optional[torch.Tensor]  # [B, T] (2D) or [B, 1, T, T] additive float (packed)
    position_ids: torch.Tensor     # [B, T]
    start: int                     # hidden column that predicts the first completion token
    targets: torch.Tensor          # [B, L] completion ids (ignore_index=-100 where masked)
    loss_mask: torch.Tensor        # [B, L] float
    segments: Optional[list] = None  # packed: per sample (row, offset, length), in input order
    padding: bool = False            # a padding micro-batch (no sample): counts in no loss total

    def to(self, device):
        f = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return RowBatch(f(self.input_ids), f(self.attention_mask), f(self.position_ids), self.start,
                        f(self.targets), f(self.loss_mask), self.segments, self.padding)

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def select(self, rows) -> "RowBatch":
        """The rows ``rows`` of an unpacked batch (same columns, so per-token tensors stay aligned)."""
        if self.segments is not None:
            raise ValueError("select() is for build_rows batches, not packed ones")
        idx = torch.as_tensor(rows, dtype=torch.long)
        return RowBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx], self.start,
                        self.targets[idx], self.loss_mask[idx])


def build_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> RowBatch:
    """Left-padded prompts + right-padded completions; the completion columns are aligned."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("build_rows needs as many prompts as completions (and at least one)")
    P = max(len(p) for p in prompts)
    L = max(1, max(len(c) for c in completions))
    B = len(prompts)
    ids = torch.full((B, P + L), pad_id, dtype=torch.long)
    att = torch.zeros((B, P + L), dtype=torch.long)
    tgt = torch.full((B, L), -100, dtype=torch.long)
    m = torch.zeros((B, L))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not p:
            raise ValueError("empty prompt: every sequence needs at least one prompt token")
        ids[i, P - len(p):P] = torch.tensor(p)
        att[i, P - len(p):P + len(c)] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c)
            tgt[i, :len(c)] = torch.tensor(c)
            m[i, :len(c)] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return RowBatch(ids[:, :-1] if L > 0 else ids, att[:, :-1], pos[:, :-1], P - 1, tgt, m)


def pack_rows(samples: list[tuple[list[int], list[int]]], pack_tokens: int, pad_id: int,
              dtype=torch.float32) -> RowBatch:
    """Pack (prompt, completion) samples into rows of at most ``pack_tokens`` tokens (first fit).

    Targets/loss_mask are laid out over the whole row (``start = 0``): position t predicts the
    token at t + 1 of the same sample; prompt tokens, sample ends and padding are masked.
    """
    seqs = [(list(p) + list(c), len(p)) for p, c in samples]
    rows: list[list[tuple[list[int], int]]] = []
    used: list[int] = []
    where = []
    for s, plen in seqs:
        n = min(len(s), pack_tokens)
        for r in range(len(rows)):
            if used[r] + n <= pack_tokens:
                break
        else:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        where.append((r, used[r], n))
        rows[r].append((s[:n], plen))
        used[r] += n
    T = max(used)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    tgt = torch.full((B, T), -100, dtype=torch.long)
    m = torch.zeros((B, T))
    for b, row in enumerate(rows):
        o = 0
        for k, (s, plen) in enumerate(row):
            n = len(s)
            ids[b, o:o + n] = torch.tensor(s)
            pos[b, o:o + n] = torch.arange(n)
            seg[b, o:o + n] = k
            # position o+t predicts s[t+1]; train where t+1 >= plen
            for t in range(max(plen - 1, 0), n - 1):
                tgt[b, o + t] = s[t + 1]
                m[b, o + t] = 1
            o += n
        # padding: each pad token is its own segment (attends only to itself: no NaN rows)
        seg[b, o:] = -2 - torch.arange(T - o)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal[None]
    mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return RowBatch(ids, mask, pos, 0, tgt, m, where)


class PromptSampler:
    """Deterministic epoch-shuffled order over ``n`` items; its whole state is the position."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.pos = n, seed, 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.pos, self.n)
            perm = self._perm(epoch)
            out.append(perm[i])
            self.pos += 1
        return out

    def _perm(self, epoch: int) -> list[int]:
        if getattr(self, "_cache", (None,))[0] != epoch:
            p = list(range(self.n))
            random.Random(f"{self.seed}-{epoch}").shuffle(p)
            self._cache = (epoch, p)
        return self._cache[1]


class ReplaySampler:
    """SFT replay (pretraining-data replay against the alignment tax, as InstructGPT's PPO-ptx): plain-text rows of
    ``data.replay_path`` mixed into SFT batches, ``round(batch_size * replay_ratio)`` rows a step.

    A replay row is trained with the all-token LM loss: its text (+ EOS) becomes a sample whose
    "prompt" is its first token only, so every later token is a target (the first token has nothing
    before it to be predicted from). Its order is a ``PromptSampler`` of its own (state: ``pos``).
    """

    def __init__(self, rows: list[dict], column: str, ratio: float, tokenizer, max_tokens: int, seed: int,
                 path: str = ""):
        check_columns(rows, [column], path, "SFT replay (data.replay_path)")
        for i, r in enumerate(rows):
            if not isinstance(r[column], str) or not r[column].strip():
                raise ValueError(f"replay dataset {path!r} row {i}: column {column!r} must be a non-empty "
                                 f"string, got {r[column]!r}")
        self.rows, self.column, self.ratio = rows, column, float(ratio)
        self.tok, self.max_tokens = tokenizer, max_tokens
        self.sampler = PromptSampler(len(rows), seed + 1)

    def count(self, batch_size: int) -> int:
        """Replay rows in a batch of ``batch_size`` (at least one task row stays)."""
        return min(batch_size - 1, int(round(batch_size * self.ratio)))

    def sample(self, i: int):
        from .samples import Sample
        ids = list(self.tok(self.rows[i][self.column], add_special_tokens=False)["input_ids"])
        ids = ids[:max(1, self.max_tokens - 1)] + [self.tok.eos_token_id]
        return Sample(ids[:1], ids[1:])

    def take(self, k: int) -> list:
        from . import distributed as dist
        return [self.sample(i) for i in dist.shard_batch(self.sampler.take(k))]
