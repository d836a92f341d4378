"""``upg-train grpo``: ``train.batch_size`` prompts, ``rollout.n`` rollouts each, group advantages, the
preset's clipped policy loss (one mixed batch through ``unified_policy_loss``)."""
from __future__ import annotations

import time

import torch

from upg_kernels.losses import group_advantages

from ..data import build_rows, encode_completion
from ..samples import Sample
from .rl import RLMethod

GROUP_PRESETS = "grpo, dr_grpo, dapo, bnpo, gspo, cispo, sapo, rloo, hpt or hpt_release"


class GRPO(RLMethod):
    name = "grpo"
    help = "RL with verifiable rewards: n rollouts per prompt, group advantages, clipped policy loss"
    defaults = {"train": {"lr": 2e-4}, "output": {"dir": "runs/grpo"}}
    loss_preset = "grpo"
    columns = ("prompt_column", "answer_column")
    process_rewards = True  # per-token advantages from reward functions that return step lists

    @classmethod
    def check_loss(cls, lc, preset):
        if lc.advantage in ("one", "given"):
            raise ValueError(f"loss preset {preset!r} (advantage={lc.advantage!r}) is not a group RL loss; "
                             f"use {GROUP_PRESETS}")
        if lc.demo_part is not None:
            raise ValueError(f"loss preset {preset!r} trains on demonstrations: use `upg-train hpt`")

    # ------------------------------------------------------------------------------ the gate
    def rl_prompts(self, P: torch.Tensor) -> torch.Tensor:
        """Which prompts train on their rollouts (the others on their demonstration): all, for grpo."""
        return torch.ones(len(P), dtype=torch.bool)

    def step(self):
        c, tr = self.cfg, self.tr
        n = c.rollout.n
        t0 = time.time()
        rows, ro, reward, per, texts, sstats = self.sample_groups(n)
        t_roll = time.time() - t0
        R = torch.tensor(reward, dtype=torch.float32).view(len(rows), n)
        correct = (R >= c.reward.correct_threshold).float()
        P = correct.mean(1)
        use_rl = self.rl_prompts(P)
        tok_adv = self.token_advantages(ro, per, texts, n)
        if tok_adv is not None and not self.process_rewards:
            raise ValueError(f"process rewards (a reward function returned step lists) train with `upg-train "
                             f"grpo`; {self.name}'s gate needs one reward per completion")
        adv = torch.zeros_like(R)
        if use_rl.any() and tok_adv is None:
            adv[use_rl] = group_advantages(R[use_rl].reshape(-1), group_size=n, mode=tr.loss_cfg.advantage,
                                           eps=tr.loss_cfg.adv_eps).view(-1, n).float()
        items: list[Sample] = []
        for i in range(len(rows)):
            if use_rl[i]:
                for j in range(n):
                    r = ro[i * n + j]
                    a = tok_adv[i * n + j] if tok_adv is not None else adv[i, j].item()
                    items.append(Sample(r.prompt_ids, r.completion_ids, advantage=a, logprobs=r.logprobs,
                                        trainable=not (c.rollout.overlong_filter and r.finish_reason == "length")))
            else:
                demo = encode_completion(tr.tok, rows[i][c.data.demo_column], c.data.max_completion_tokens)
                items.append(Sample(tr.prompt_ids(rows[i]), demo, is_demo=True))
        m_all: dict = {}
        minis = [[self.micro(chunk) for chunk in tr.split(mini, c.train.grad_accum)]
                 for mini in tr.split(items, c.train.mini_batches)]
        for micro in minis:  # before the first update: pi_old of every mini-batch is the sampling policy
            if c.train.mini_batches > 1:
                tr.fill_logprobs(micro, "old_logprobs", tr.model, tr.softcap)
            if tr.ref is not None:
                tr.fill_logprobs(micro, "ref_logprobs", tr.ref, tr.ref_softcap)
        for micro in minis:
            for k, v in tr.update(micro).items():
                m_all.setdefault(k, []).append(v)
        m = {k: sum(v) / len(v) for k, v in m_all.items()}
        m.update(self.rollout_metrics(ro, R, correct, P, use_rl, items))
        m.update(sstats, rollout_time=t_roll)
        if c.rollout.overlong_filter:
            m["overlong_filtered"] = float(sum(not s.trainable for s in items if not s.is_demo) / max(1, len(ro)))
        return m

    def micro(self, chunk: list[Sample]):
        """One micro-batch ``(RowBatch, extra)`` of samples (RL rows and demonstrations)."""
        tr, lc = self.tr, self.tr.loss_cfg
        if not chunk:  # padding micro-batch: one zero-mask row, advantage 0, not a demonstration
            mb = tr.pad_batch()
            extra = {"advantages": torch.zeros(1)}
            if lc.rollout_is is not None:
                extra["rollout_logprobs"] = torch.zeros(mb.targets.shape)
            return mb, extra
        mb = build_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], tr.tok.pad_token_id)
        for i, s in enumerate(chunk):
            if not s.trainable:
                mb.loss_mask[i] = 0.0
        B, L = mb.targets.shape
        if any(isinstance(s.advantage, list) for s in chunk):  # per-token (process rewards)
            a = torch.zeros(B, L)
            for i, s in enumerate(chunk):
                v = s.advantage if isinstance(s.advantage, list) else [s.advantage] * len(s.completion_ids)
                a[i, :len(v)] = torch.tensor(v, dtype=torch.float32)
            extra = {"advantages": a}
        else:
            extra = {"advantages": torch.tensor([s.advantage for s in chunk], dtype=torch.float32)}
        if any(s.is_demo for s in chunk):
            extra["is_demo"] = torch.tensor([s.is_demo for s in chunk], dtype=torch.bool)
        if lc.rollout_is is not None:
            missing = sum(1 for s in chunk if not s.is_demo and s.logprobs is None)
            if missing:
                # an importance weight against log-probs of 0 would be exp(old) (silently wrong): refuse
                raise ValueError(f"loss rollout_is={lc.rollout_is!r} needs the sampler's log-probs, "
                                 f"but the rollout engine returned none for {missing} RL row(s) of this "
                                 f"micro-batch (rollout.engine={self.cfg.rollout.engine!r}); use an engine that "
                                 "returns them or drop rollout_is from loss.overrides / the preset")
            rl = torch.zeros(B, L)
            for i, s in enumerate(chunk):
                if s.logprobs is not None:
                    rl[i, :len(s.logprobs)] = torch.as_tensor(s.logprobs, dtype=torch.float32)
            extra["rollout_logprobs"] = rl
        return mb, extra
