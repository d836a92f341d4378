"""``upg-train hpt``: Hybrid Post-Training. As grpo, then per prompt P = mean correctness of its
rollouts: P > hpt.gamma -> its rollouts are RL rows, else its demonstration is one SFT row
(``is_demo``); one mixed batch, one loss call."""
from __future__ import annotations

import torch

from .grpo import GRPO


class HPT(GRPO):
    name = "hpt"
    help = ("Hybrid Post-Training: per prompt, RL on its rollouts if their accuracy P > gamma, else SFT "
            "on its demonstration (presets: hpt = paper, hpt_release = released code)")
    sections = ("hpt",)
    defaults = {"train": {"lr": 2e-4}, "output": {"dir": "runs/hpt"}}
    loss_preset = "hpt"
    columns = ("prompt_column", "answer_column", "demo_column")
    process_rewards = False  # the gate needs one reward per completion

    @classmethod
    def check_loss(cls, lc, preset):
        if lc.advantage in ("one", "given"):
            super().check_loss(lc, preset)
        if lc.demo_part != "sft":
            raise ValueError(f"`upg-train hpt` needs a preset with SFT demonstrations (hpt, hpt_release), "
                             f"got {preset!r}")

    def rl_prompts(self, P: torch.Tensor) -> torch.Tensor:
        return P > self.cfg.hpt.gamma

    def no_signal_note(self):
        return "hpt trains every prompt on its demonstration (SFT) meanwhile"
