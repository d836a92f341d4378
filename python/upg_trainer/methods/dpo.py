"""``upg-train dpo``: rows ``[chosen..., rejected...]`` of one batch through ``upg_kernels.preference_loss``
(hidden states + lm_head weight; the sequence log-probs come from the fused kernel), the reference
log-prob sums from the frozen reference (the initial policy, i.e. the SFT checkpoint given as
model.path, or model.ref_path) through ``upg_kernels.sequence_logprobs``."""
from __future__ import annotations

import torch

from .. import distributed as dist
from ..data import build_rows
from ..model import hidden_states
from .pairs import PairMethod


class DPO(PairMethod):
    name = "dpo"
    help = ("preference optimisation (DPO, IPO, hinge, robust, SimPO, ORPO presets) from an SFT checkpoint; "
            "the reference is that checkpoint")
    sections = ("pref",)
    defaults = {"train": {"lr": 1e-4, "batch_size": 16}, "output": {"dir": "runs/dpo"}}

    def __init__(self, trainer):
        super().__init__(trainer)
        from upg_kernels import PreferenceConfig
        p = self.cfg.pref
        self.pref_cfg = PreferenceConfig.preset(p.preset, **dict(p.overrides or {}))

    def eval_path(self):
        # held-out pairs always; on the embedded task greedy accuracy too (unless data.eval_path is '')
        d = self.cfg.data
        return "embedded" if d.path == "embedded" and d.eval_path else ""

    def needs_reference(self):
        return self.pref_cfg.use_reference

    def setup(self):
        if self.tr.softcap is not None:
            raise ValueError("`upg-train dpo`: preference_loss has no final-logit softcapping; this model "
                             f"softcaps its logits (final_logit_softcapping={self.tr.softcap})")

    def pair_rows(self, pairs):
        return build_rows([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs],
                          self.tr.tok.pad_token_id)

    def seq_logps(self, model, mb):
        """Per-row log-prob sums ``[2B]`` of a pair batch under ``model`` (fused kernel)."""
        from upg_kernels import sequence_logprobs

        def fn(lm):
            h = hidden_states(lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
            w, b = dist.output_weight(lm)
            return sequence_logprobs(h, w, mb.targets, loss_mask=mb.loss_mask.bool(), bias=b,
                                     backend=self.cfg.loss.backend)
        return dist.forward_call(model, fn)

    @torch.no_grad()
    def ref_logps(self, mb) -> torch.Tensor:
        return self.seq_logps(self.tr.ref, mb.to(self.tr.device)).float().cpu()

    def loss_out(self, model, mb, ref):
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

    def step(self):
        tr = self.tr
        pairs = self.take_pairs()
        total = dist.all_reduce_sum(len(pairs))
        micro = []
        for chunk in tr.split(pairs, self.cfg.train.grad_accum):
            mb = self.pair_rows(chunk)
            extra = {"ref": self.ref_logps(mb)} if tr.ref is not None else {}
            micro.append((mb, extra))

        def loss_of(k, mb, extra):
            B = mb.targets.shape[0] // 2
            loss, out = self.loss_out(tr.model, mb, extra.get("ref"))
            return loss * (B * dist.world_size() / total), out.metrics, B
        m = tr.update(micro, loss_of)
        m["tokens"] = int(dist.all_reduce_sum(sum(len(p) * 2 + len(c) + len(r) for p, c, r in pairs)))
        return m

    def pair_margins(self, pairs):
        """The implicit rewards beta * (log pi - log pi_ref) (or the preset's reference-free scores)."""
        tr = self.tr
        mb = self.pair_rows(pairs)
        ref = self.ref_logps(mb).to(tr.device) if tr.ref is not None else None
        _, out = self.loss_out(tr.model, mb.to(tr.device), ref)
        return (out.chosen_rewards - out.rejected_rewards).float()
