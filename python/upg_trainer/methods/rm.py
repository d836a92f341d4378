"""``upg-train rm``: a reward model, a scalar head on the trunk (``value_model.ScalarHeadModel``);
r = the head at the last token of prompt + completion; ``upg_kernels.pairwise_reward_loss``
(Bradley-Terry) on prompt/chosen/rejected pairs."""
from __future__ import annotations

import torch

from .. import distributed as dist
from ..preference import SeqBatch
from ..value_model import sequence_batch
from .pairs import PairMethod


class RM(PairMethod):
    name = "rm"
    help = ("reward model: a scalar head on a causal LM (or a sequence-classification model), Bradley-Terry "
            "loss on prompt/chosen/rejected pairs, pairwise accuracy on held-out pairs")
    sections = ("rm",)
    defaults = {"train": {"lr": 1e-3, "batch_size": 16}, "output": {"dir": "runs/rm"}}
    generates = False   # no rollouts, no greedy evaluation
    logprobs = False    # the reward model is never asked for log-probs

    def load_model(self):
        from ..value_model import load_scalar_model
        m = self.cfg.model
        return load_scalar_model(m.path, dtype=m.dtype, device=m.device, seed=self.cfg.train.seed,
                                 attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)

    def eval_path(self):
        return ""  # held-out pairs only

    def load_weights(self, sd, path):
        from ..checkpoint import load_model_weights
        lm = self.tr.lm  # value_head.safetensors holds the head's weight/bias
        lm.head.load_state_dict({k: sd.pop(k) for k in ("weight", "bias") if k in sd})
        load_model_weights(lm.lm, sd, path)

    def save_model(self, path, sd, final=False):
        self.tr.lm.save(path, self.tr.tok, sd)

    def pair_seqs(self, pairs) -> SeqBatch:
        return SeqBatch(*sequence_batch([p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs],
                                        self.tr.tok.pad_token_id))

    def scores(self, sb: SeqBatch) -> torch.Tensor:
        v = dist.forward_call(self.tr.model, lambda m: m.values(sb.input_ids, sb.attention_mask, sb.position_ids))
        return v.gather(1, sb.last[:, None])[:, 0]

    def step(self):
        from upg_kernels import pairwise_reward_loss
        c, tr = self.cfg, self.tr
        pairs = self.take_pairs()
        total = dist.all_reduce_sum(len(pairs))
        micro = [(self.pair_seqs(chunk), {}) for chunk in tr.split(pairs, c.train.grad_accum)]

        def loss_of(k, sb, extra):
            r = self.scores(sb)
            B = r.shape[0] // 2
            loss = pairwise_reward_loss(r[:B], r[B:], margin=c.rm.margin or None, center_coef=c.rm.center_coef)
            d = (r[:B] - r[B:]).detach()
            return (loss * (B * dist.world_size() / total),
                    {"accuracy": float((d > 0).float().mean()), "reward_margin": float(d.mean()),
                     "reward_chosen": float(r[:B].detach().mean()), "reward_rejected": float(r[B:].detach().mean())},
                    B)
        m = tr.update(micro, loss_of)
        m["tokens"] = int(dist.all_reduce_sum(sum(len(p) * 2 + len(a) + len(b) for p, a, b in pairs)))
        return m

    def pair_margins(self, pairs):
        r = self.scores(self.pair_seqs(pairs).to(self.tr.device)).float()
        B = r.shape[0] // 2
        return r[:B] - r[B:]
