"""``upg-train sft``: supervised fine-tuning on the demonstration column (NLL on completion tokens)."""
from __future__ import annotations

from .. import distributed as dist
from ..data import build_rows, encode_completion, pack_rows
from ..samples import Sample
from .base import Method


class SFT(Method):
    name = "sft"
    help = "supervised fine-tuning on the demonstration column (loss only on completion tokens, packed)"
    defaults = {"train": {"lr": 1e-3, "batch_size": 32}, "output": {"dir": "runs/sft"}}
    loss_preset = "sft"
    columns = ("prompt_column", "demo_column")

    @classmethod
    def check_loss(cls, lc, preset):
        if lc.advantage != "one":
            raise ValueError(f"loss preset {preset!r} needs rewards/advantages: use it with `upg-train grpo`, "
                             "not `sft` (sft presets: sft, dft)")

    def setup(self):
        d = self.cfg.data
        self.replay = None
        if d.replay_path:
            from ..data import ReplaySampler, load_rows
            self.replay = ReplaySampler(load_rows(d.replay_path, split=d.split), d.replay_column, d.replay_ratio,
                                        self.tr.tok, d.max_completion_tokens, self.cfg.train.seed, d.replay_path)

    def state_dict(self):
        return {"replay_pos": self.replay.sampler.pos} if self.replay is not None else {}

    def load_state_dict(self, st):
        if self.replay is not None:
            self.replay.sampler.pos = st["replay_pos"]

    def micro_batches(self, samples: list[Sample]):
        c, tr = self.cfg, self.tr
        micro = []
        for chunk in tr.split(samples, c.train.grad_accum):
            if not chunk:
                mb = tr.pad_batch()
            elif c.data.packing:
                mb = pack_rows([(s.prompt_ids, s.completion_ids) for s in chunk],
                               max(c.data.pack_tokens, max(s.num_tokens for s in chunk)),
                               tr.tok.pad_token_id, dtype=next(tr.lm.parameters()).dtype)
            else:
                mb = build_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                tr.tok.pad_token_id)
            micro.append((mb, {}))
        return micro

    def step(self):
        c, tr = self.cfg, self.tr
        n_replay = self.replay.count(c.train.batch_size) if self.replay is not None else 0
        idx = dist.shard_batch(tr.sampler.take(c.train.batch_size - n_replay))
        samples = [Sample(tr.prompt_ids(tr.train_rows[i]),
                          encode_completion(tr.tok, tr.train_rows[i][c.data.demo_column],
                                            c.data.max_completion_tokens))
                   for i in idx]
        if n_replay:
            samples += self.replay.take(n_replay)
        micro = self.micro_batches(samples)
        if tr.ref is not None:
            tr.fill_logprobs(micro, "ref_logprobs", tr.ref, tr.ref_softcap)
        m = tr.update(micro)
        m["tokens"] = int(dist.all_reduce_sum(sum(s.num_tokens for s in samples)))
        m["sft_share"] = 1.0
        if self.replay is not None:
            m["replay_share"] = n_replay / c.train.batch_size
        return m
