"""``upg-train luffy``: LUFFY's off-policy demonstrations inside the groups. As grpo, and per prompt its
demonstration, scored by the same reward functions, is member ``n + 1`` of its group: the advantages
are taken over the n rollouts and the demonstration, the rollouts train with the preset's clipped loss,
the demonstration with the shaped ``-A p/(p + shaping_gamma)``; one token mean over both (the trainer's
part weights, ``Trainer.policy_loss_of``)."""
from __future__ import annotations

import torch

from upg_kernels.losses import group_advantages

from ..data import encode_completion, prompt_text
from .grpo import GRPO


class LUFFY(GRPO):
    name = "luffy"
    help = ("LUFFY: each prompt's demonstration joins its group of n rollouts (advantages over n + 1), "
            "shaped loss -A p/(p+gamma) on it, clipped loss on the rollouts")
    defaults = {"train": {"lr": 2e-4}, "output": {"dir": "runs/luffy"}}
    loss_preset = "luffy"
    columns = ("prompt_column", "answer_column", "demo_column")
    process_rewards = False  # the group needs one reward per member

    @classmethod
    def check_loss(cls, lc, preset):
        if lc.advantage in ("one", "given") or lc.demo_part != "shaped":
            raise ValueError(f"`upg-train luffy` needs a group preset with shaped demonstrations "
                             f"(demo_part='shaped': luffy), got {preset!r}")

    def advantages(self, rows, R, use_rl, scalar):
        c, tr, lc = self.cfg, self.tr, self.tr.loss_cfg
        n = R.shape[1]
        demos = {i: encode_completion(tr.tok, r[c.data.demo_column], c.data.max_completion_tokens)
                 for i, r in enumerate(rows)}
        d_reward, _ = tr.rewards([prompt_text(r[c.data.prompt_column]) for r in rows],
                                 [r[c.data.demo_column] for r in rows], tr.columns_of(rows))
        R_g = torch.cat([R, torch.tensor(d_reward, dtype=torch.float32).view(-1, 1)], 1)
        adv = group_advantages(R_g.reshape(-1), group_size=n + 1, mode=lc.advantage,
                               eps=lc.adv_eps).view(-1, n + 1).float()
        return adv, demos

    def no_signal_note(self):
        return "luffy's demonstrations still carry signal in groups whose rollouts all fail"
