"""What the two pairwise methods share (dpo, rm): preference pairs as training data, a batch of
``train.batch_size`` pairs a step, and the held-out pair metrics."""
from __future__ import annotations

import torch

from .. import distributed as dist
from ..data import PromptSampler, encode_completion
from ..preference import completion_text, load_preference_rows
from .base import Method

EVAL_BATCH = 32


class PairMethod(Method):
    batch_unit = "pairs"
    single_process = True
    columns = ("prompt_column", "chosen_column", "rejected_column")

    def load_data(self):
        tr = self.tr
        tr.train_rows, self.eval_pairs = load_preference_rows(self.cfg)
        tr.sampler = PromptSampler(len(tr.train_rows), self.cfg.train.seed)

    def has_eval(self):
        return bool(self.eval_pairs)

    def pair_ids(self, row: dict) -> tuple[list, list, list]:
        d, tok = self.cfg.data, self.tr.tok
        p = self.tr.prompt_ids(row)
        c = encode_completion(tok, completion_text(row[d.chosen_column], d.chosen_column, 0, d.path),
                              d.max_completion_tokens)
        r = encode_completion(tok, completion_text(row[d.rejected_column], d.rejected_column, 0, d.path),
                              d.max_completion_tokens)
        return p, c, r

    def take_pairs(self) -> list:
        tr = self.tr
        return [self.pair_ids(tr.train_rows[i]) for i in dist.shard_batch(tr.sampler.take(self.cfg.train.batch_size))]

    def pair_margins(self, pairs) -> torch.Tensor:
        """Per pair, the held-out score of chosen minus rejected (> 0 = ranked right)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Pairwise accuracy and mean margin on the held-out pairs (``pair_margins``)."""
        rows, model = self.eval_pairs, self.tr.model
        if not rows:
            return {}
        was = model.training
        model.eval()
        acc = margin = n = 0.0
        try:
            for i in range(0, len(rows), EVAL_BATCH):
                d = self.pair_margins([self.pair_ids(r) for r in rows[i:i + EVAL_BATCH]])
                acc += float((d > 0).float().sum())
                margin += float(d.sum())
                n += d.numel()
        finally:
            model.train(was)
        return {"eval/pair_accuracy": acc / n, "eval/reward_margin": margin / n}
