"""Preference data and the two pairwise steps: ``upg-train dpo`` and ``upg-train rm``.

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

from . import distributed as dist
from .data import build_rows, check_columns, encode_completion, load_rows
from .model import hidden_states
from .value_model import sequence_batch

EVAL_BATCH = 32


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


class PreferenceSteps:
    """``dpo_step`` / ``rm_step`` and the held-out pair metrics; mixed into ``Trainer``."""

    def _pair_ids(self, row: dict) -> tuple[list, list, list]:
        d = self.cfg.data
        p = self._prompt_ids(row)
        c = encode_completion(self.tok, completion_text(row[d.chosen_column], d.chosen_column, 0, d.path),
                              d.max_completion_tokens)
        r = encode_completion(self.tok, completion_text(row[d.rejected_column], d.rejected_column, 0, d.path),
                              d.max_completion_tokens)
        return p, c, r

    def _pair_rows(self, pairs) -> torch.Tensor:
        return build_rows([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs],
                          self.tok.pad_token_id)

    def _pair_seqs(self, pairs) -> SeqBatch:
        return SeqBatch(*sequence_batch([p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs],
                                        self.tok.pad_token_id))

    def _take_pairs(self) -> list:
        return [self._pair_ids(self.train_rows[i])
                for i in dist.shard_batch(self.sampler.take(self.cfg.train.batch_size))]

    # ------------------------------------------------------------------------------ dpo
    def _seq_logps(self, model, mb):
        """Per-row log-prob sums ``[2B]`` of a pair batch under ``model`` (fused kernel)."""
        from upg_kernels import sequence_logprobs

        def fn(lm):
            h = hidden_states(lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
            w, b = dist.output_weight(lm)
            return sequence_logprobs(h, w, mb.targets, loss_mask=mb.loss_mask.bool(), bias=b,
                                     backend=self.cfg.loss.backend)
        return dist.forward_call(model, fn)

    @torch.no_grad()
    def _ref_logps(self, mb) -> torch.Tensor:
        return self._seq_logps(self.ref, mb.to(self.device)).float().cpu()

    def _dpo_out(self, model, mb, ref):
        from upg_kernels import preference_loss
        B = mb.targets.shape[0] // 2

        def fn(lm):
            h = hidden_states(lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
            w, b = dist.output_weight(lm)
            return preference_loss(h, w, mb.targets, config=self.pref_cfg, loss_mask=mb.loss_mask.bool(),
                                   ref_chosen_logps=None if ref is None else ref[:B],
                                   ref_rejected_logps=None if ref is None else ref[B:], bias=b,
                                   backend=self.cfg.loss.backend)
        box = []
        loss = dist.forward_call(model, lambda lm: box.append(fn(lm)) or box[0].loss)
        return loss, box[0]

    def dpo_step(self) -> dict:
        pairs = self._take_pairs()
        total = dist.all_reduce_sum(len(pairs))
        micro = []
        for chunk in self._split(pairs, self.cfg.train.grad_accum):
            mb = self._pair_rows(chunk)
            extra = {"ref": self._ref_logps(mb)} if self.ref is not None else {}
            micro.append((mb, extra))

        def loss_of(k, mb, extra):
            B = mb.targets.shape[0] // 2
            loss, out = self._dpo_out(self.model, mb, extra.get("ref"))
            return loss * (B * dist.world_size() / total), out.metrics, B
        m = self._update(micro, loss_of)
        m["tokens"] = int(dist.all_reduce_sum(sum(len(p) * 2 + len(c) + len(r) for p, c, r in pairs)))
        return m

    # ------------------------------------------------------------------------------ rm
    def _rm_scores(self, model, sb: SeqBatch) -> torch.Tensor:
        v = dist.forward_call(model, lambda m: m.values(sb.input_ids, sb.attention_mask, sb.position_ids))
        return v.gather(1, sb.last[:, None])[:, 0]

    def rm_step(self) -> dict:
        from upg_kernels import pairwise_reward_loss
        c = self.cfg
        pairs = self._take_pairs()
        total = dist.all_reduce_sum(len(pairs))
        micro = [(self._pair_seqs(chunk), {}) for chunk in self._split(pairs, c.train.grad_accum)]

        def loss_of(k, sb, extra):
            r = self._rm_scores(self.model, sb)
            B = r.shape[0] // 2
            loss = pairwise_reward_loss(r[:B], r[B:], margin=c.rm.margin or None, center_coef=c.rm.center_coef)
            d = (r[:B] - r[B:]).detach()
            return (loss * (B * dist.world_size() / total),
                    {"accuracy": float((d > 0).float().mean()), "reward_margin": float(d.mean()),
                     "reward_chosen": float(r[:B].detach().mean()), "reward_rejected": float(r[B:].detach().mean())},
                    B)
        m = self._update(micro, loss_of)
        m["tokens"] = int(dist.all_reduce_sum(sum(len(p) * 2 + len(a) + len(b) for p, a, b in pairs)))
        return m

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate_pairs(self) -> dict:
        """Held-out pair metrics: rm = pairwise accuracy / margin of the scores; dpo = accuracy / margin
        of the implicit rewards beta * (log pi - log pi_ref) (or the preset's reference-free scores)."""
        rows = getattr(self, "pair_eval_rows", [])
        if not rows:
            return {}
        was = self.model.training
        self.model.eval()
        acc = margin = n = 0.0
        try:
            for i in range(0, len(rows), EVAL_BATCH):
                pairs = [self._pair_ids(r) for r in rows[i:i + EVAL_BATCH]]
                if self.cfg.command == "rm":
                    r = self._rm_scores(self.model, self._pair_seqs(pairs).to(self.device)).float()
                    B = r.shape[0] // 2
                    d = r[:B] - r[B:]
                else:
                    mb = self._pair_rows(pairs)
                    ref = self._ref_logps(mb).to(self.device) if self.ref is not None else None
                    _, out = self._dpo_out(self.model, mb.to(self.device), ref)
                    d = (out.chosen_rewards - out.rejected_rewards).float()
                acc += float((d > 0).float().sum())
                margin += float(d.sum())
                n += d.numel()
        finally:
            self.model.train(was)
        return {"eval/pair_accuracy": acc / n, "eval/reward_margin": margin / n}
