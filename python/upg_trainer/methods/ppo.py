"""``upg-train ppo``: RLHF-PPO with a critic (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017).

One step (all per-token tensors are ``[N, L]`` over the batch's N = batch_size * rollout.n
completions, aligned with the completion tokens):

1. sample (``RLMethod.sample_groups``: rollouts, reward functions or ``rm:PATH``, DAPO options);
2. without gradient: the sampling policy's log-probs (pi_old), the frozen reference's, the critic's
   values V(s_t) (the value head on the hidden state that predicts token t);
3. ``upg_kernels.kl_penalty_rewards``: r_t = -beta * KL_t (+ the score on the last token), beta from
   a fixed or adaptive controller (``upg_kernels.AdaptiveKLController``);
4. ``upg_kernels.gae``: advantages and returns; ``upg_kernels.whiten`` on the advantages;
5. per mini-batch (``train.mini_batches``): the policy update with ``unified_policy_loss``'s ``ppo``
   preset (clipped ratio against pi_old, per-token advantages), then the critic update with
   ``upg_kernels.value_loss`` (clipped around the rollout-time values). ``ppo.critic = shared``: a
   value head on the policy trunk, trained in the same backward (policy loss + vf_coef * value loss).
"""
from __future__ import annotations

import math
import os
import time

import torch

from .. import distributed as dist
from ..data import build_rows
from ..model import hidden_states
from ..samples import Sample
from .rl import RLMethod

VALUE_HEAD = "upg_value_head"  # the shared critic's head as a submodule of the policy


class PPO(RLMethod):
    name = "ppo"
    help = ("RLHF-PPO: actor, critic (separate or a value head), frozen reference, KL-in-reward, GAE; rewards "
            "from verifiers or an rm:PATH reward model")
    sections = ("ppo",)
    defaults = {"train": {"lr": 2e-4}, "rollout": {"n": 4}, "output": {"dir": "runs/ppo"}}
    loss_preset = "ppo"
    columns = ("prompt_column",)
    single_process = True

    @classmethod
    def check_loss(cls, lc, preset):
        if lc.advantage != "given":
            raise ValueError(f"`upg-train ppo` trains on GAE advantages: use a preset with advantage='given' "
                             f"(ppo), got {preset!r}")

    def needs_reference(self):
        p = self.cfg.ppo
        return super().needs_reference() or p.kl_coef > 0 or p.adaptive_kl

    def setup(self):
        from upg_kernels import AdaptiveKLController, FixedKLController
        from ..schedule import make_scheduler
        from ..value_model import load_scalar_model, new_head
        super().setup()
        tr, c, p = self.tr, self.cfg, self.cfg.ppo
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(p.kl_coef))
        self.critic = self.value_head = None
        if p.critic == "shared":
            # a submodule of the policy: trained by its optimizer, saved in its checkpoints (dropped from
            # final/, written there as value_head.safetensors)
            w = next(tr.lm.parameters())
            self.value_head = new_head(int(tr.lm.config.hidden_size), w.dtype, tr.device, zero=True)
            tr.lm.add_module(VALUE_HEAD, self.value_head)
            return
        src = p.critic_path or next((f[3:] for f in c.reward.funcs if isinstance(f, str) and f.startswith("rm:")),
                                    c.model.path)
        try:
            self.critic, _tok, _dev = load_scalar_model(src, dtype=c.model.dtype, device=c.model.device,
                                                        seed=c.train.seed, zero_head=True,
                                                        attn_implementation=c.model.attn_implementation)
        except Exception as e:
            raise RuntimeError(f"could not build the PPO critic from {src!r} (ppo.critic_path / the rm:PATH "
                               f"reward / model.path): {type(e).__name__}: {e}") from e
        V = tr.lm.get_input_embeddings().weight.shape[0]
        Vc = self.critic.lm.get_input_embeddings().weight.shape[0]
        if V != Vc:
            raise ValueError(f"the critic {src!r} has a vocabulary of {Vc} tokens, the policy {V}: the critic "
                             "reads the policy's token ids, so they need the same tokenizer")
        self.critic.to(tr.device).train()
        t = c.train
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=p.critic_lr or t.lr,
                                            betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.critic_sched = make_scheduler(self.critic_opt, t.schedule, t.max_steps * t.mini_batches,
                                           t.warmup_steps, t.min_lr_ratio)

    def state_dict(self) -> dict:
        st = {"kl_ctl": self.kl_ctl.state_dict()}
        if self.critic is not None:
            st.update(critic=self.critic.state_dict(), critic_opt=self.critic_opt.state_dict(),
                      critic_sched=self.critic_sched.state_dict())
        return st

    def load_state_dict(self, st: dict) -> None:
        self.kl_ctl.load_state_dict(st["kl_ctl"])
        if self.critic is not None:
            self.critic.load_state_dict(st["critic"])
            self.critic_opt.load_state_dict(st["critic_opt"])
            self.critic_sched.load_state_dict(st["critic_sched"])

    def save_model(self, path, sd, final=False):
        """A shared value head is part of the policy's checkpoints; ``final/`` holds the policy alone,
        the head as ``value_head.safetensors`` beside it, and a separate critic as ``final/critic`` (an
        rm-format checkpoint)."""
        from ..value_model import HEAD_FILE
        head = {k[len(VALUE_HEAD) + 1:]: v for k, v in sd.items() if k.startswith(VALUE_HEAD + ".")}
        if final and head:
            sd = {k: v for k, v in sd.items() if not k.startswith(VALUE_HEAD + ".")}
        super().save_model(path, sd, final)
        if final and head:
            from safetensors.torch import save_file
            save_file({k: v.contiguous().cpu() for k, v in head.items()}, os.path.join(path, HEAD_FILE))
        if final and self.critic is not None:
            self.critic.save(os.path.join(path, "critic"), self.tr.tok)

    # --------------------------------------------------------------------------------------------
    def values(self, mb) -> torch.Tensor:
        """V(s_t) ``[b, L]`` of a rollout batch: the critic, or the policy trunk's value head."""
        if self.critic is not None:
            return self.critic.values(mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
        h = hidden_states(self.tr.lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def rollout_tensors(self, full, chunks) -> dict:
        """pi_old, reference log-probs and values of the whole batch, computed chunk by chunk."""
        from upg_kernels import token_logprobs
        tr = self.tr
        N, L = full.targets.shape
        out = {k: torch.zeros(N, L) for k in ("old", "ref", "values")}
        models = [m for m in (tr.model, tr.ref, self.critic) if m is not None]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            for idx in chunks:
                mb = full.select(idx).to(tr.device)
                for key, model, cap in (("old", tr.model, tr.softcap), ("ref", tr.ref, tr.ref_softcap)):
                    if model is None:
                        continue

                    def fn(lm):
                        h = hidden_states(lm, mb.input_ids, mb.attention_mask, mb.position_ids)[:, mb.start:]
                        w, b = dist.output_weight(lm)
                        return token_logprobs(h, w, mb.targets, bias=b, temperature=tr.temperature(),
                                              backend=self.cfg.loss.backend, softcap=cap)
                    out[key][idx] = dist.forward_call(model, fn).float().cpu()
                out["values"][idx] = self.values(mb).float().cpu()
        finally:
            for m, t in zip(models, modes):
                m.train(t)
        if tr.ref is None:
            out["ref"] = out["old"].clone()
        return out

    def step(self) -> dict:
        from upg_kernels import gae, kl_penalty_rewards, whiten
        c, p, tr = self.cfg, self.cfg.ppo, self.tr
        n = c.rollout.n
        t0 = time.time()
        rows, ro, reward, per, texts, sstats = self.sample_groups(n)
        t_roll = time.time() - t0
        items = [Sample(r.prompt_ids, r.completion_ids, logprobs=r.logprobs,
                        trainable=not (c.rollout.overlong_filter and r.finish_reason == "length")) for r in ro]
        full = build_rows([s.prompt_ids for s in items], [s.completion_ids for s in items], tr.tok.pad_token_id)
        for i, s in enumerate(items):
            if not s.trainable:
                full.loss_mask[i] = 0.0
        mask = full.loss_mask > 0
        N = len(items)
        minis = tr.split(list(range(N)), c.train.mini_batches)
        chunks = [ch for mini in minis for ch in tr.split(mini, c.train.grad_accum) if ch]
        t = self.rollout_tensors(full, chunks)
        scores = torch.tensor(reward, dtype=torch.float32)
        if p.whiten_rewards and N > 1:
            scores = (scores - scores.mean()) / (scores.std() + 1e-8)
        beta = self.kl_ctl.value
        rewards = kl_penalty_rewards(scores, t["old"], t["ref"], mask, beta, p.kl_type)
        adv, returns = gae(rewards, t["values"], mask, gamma=p.gamma, lam=p.lam)
        if p.whiten_advantages:
            adv = whiten(adv, mask)
        m_all: dict = {}
        for mini in minis:
            micro = []
            for ch in tr.split(mini, c.train.grad_accum):
                if not ch:
                    mb = tr.pad_batch()
                    z = torch.zeros(mb.targets.shape)
                    micro.append((mb, {"advantages": z, "old_logprobs": z, "returns": z, "old_values": z}))
                    continue
                micro.append((full.select(ch), {"advantages": adv[ch].float(), "old_logprobs": t["old"][ch],
                                                "returns": returns[ch].float(), "old_values": t["values"][ch]}))
            tot_tok = float(sum(mb.loss_mask.sum() for mb, _ in micro))
            self.update(micro, tot_tok, m_all)
        m = {k: sum(v) / len(v) for k, v in m_all.items()}
        with torch.no_grad():
            kl_tok = torch.where(mask, t["old"] - t["ref"], torch.zeros(()))
            kl_seq = float(kl_tok.sum(-1).mean())
        self.kl_ctl.update(kl_seq, N)
        R = scores.view(len(rows), n) if not p.whiten_rewards else torch.tensor(reward).view(len(rows), n)
        correct = (R >= c.reward.correct_threshold).float()
        m.update(self.rollout_metrics(ro, R, correct, correct.mean(1), torch.ones(len(rows), dtype=torch.bool),
                                      items))
        m.update(sstats, rollout_time=t_roll, kl_coef=beta, kl_seq=kl_seq,
                 score_return=float(torch.where(mask, rewards, torch.zeros(())).sum(-1).mean()))
        m.pop("sft_share", None)
        return m

    def update(self, micro, tot_tok: float, m_all: dict) -> None:
        """One mini-batch: the policy update, then the critic's (or one joint update with a shared head)."""
        from upg_kernels import value_loss
        p, tr = self.cfg.ppo, self.tr
        extras_policy = [(mb, {k: v for k, v in e.items() if k in ("advantages", "old_logprobs")}) for mb, e in micro]
        if self.critic is None:  # shared trunk: one backward for policy + vf_coef * value loss
            vm: dict = {}

            def value_term(k, mb, extra, h):
                share = float(mb.loss_mask.sum()) / tot_tok if tot_tok else 0.0
                v = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
                lv, met = value_loss(v, extra["old_values"], extra["returns"], mb.loss_mask > 0,
                                     clip_range=p.cliprange_value)
                vm[k] = met
                return p.vf_coef * share * lv
            policy_of = tr.policy_loss_of(extras_policy, extra_term=value_term, extra_keys=("old_values", "returns"))

            def loss_of(k, mb, extra):
                loss, metrics, w = policy_of(k, mb, extra)
                return loss, dict(metrics, **_finite(vm.pop(k, {}))), w
            for key, v in tr.update(micro, loss_of).items():
                m_all.setdefault(key, []).append(v)
            return
        for key, v in tr.update(extras_policy).items():
            m_all.setdefault(key, []).append(v)

        def critic_of(k, mb, extra):
            share = float(mb.loss_mask.sum()) / tot_tok if tot_tok else 0.0
            v = self.values(mb)
            lv, met = value_loss(v, extra["old_values"], extra["returns"], mb.loss_mask > 0,
                                 clip_range=p.cliprange_value)
            return lv * share, _finite(met), float(mb.loss_mask.sum())
        cm = tr.update(micro, critic_of, model=self.critic, opt=self.critic_opt, sched=self.critic_sched)
        for key, v in cm.items():
            m_all.setdefault("critic/" + key if key in ("loss", "grad_norm", "lr") else key, []).append(v)


def _finite(m: dict) -> dict:
    """Metrics without NaN/inf entries (explained variance is NaN when the returns are constant)."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)}
