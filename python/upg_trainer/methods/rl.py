"""What the methods that sample rollouts share (grpo, hpt, ppo): generation, scoring, DAPO dynamic
sampling, process rewards, the rollout metrics and the no-learning-signal warning."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .. import distributed as dist
from ..data import prompt_text
from ..samples import keep_informative_groups, process_advantages, soft_overlong_punishment, step_ends
from .base import Method

NO_SIGNAL_STEPS = 3  # first steps whose rewards are all equal before the warning


def consumed(sampled: int, demo_items: list) -> dict:
    """What a step consumed, summed over ranks: ``sampled_tokens`` (completion tokens the rollout engine
    generated for training, trained on or not; evaluation not counted), ``demos_used`` /
    ``demo_tokens_used`` (demonstrations trained on and their completion tokens)."""
    return dict(sampled_tokens=int(dist.all_reduce_sum(int(sampled))),
                demos_used=int(dist.all_reduce_sum(len(demo_items))),
                demo_tokens_used=int(dist.all_reduce_sum(sum(len(s.completion_ids) for s in demo_items))))


class RLMethod(Method):
    rollouts = True
    needs_reward = True
    one_update = False
    batch_unit = "prompts"

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        t = cfg.train
        if t.batch_size * cfg.rollout.n % (t.grad_accum * t.mini_batches):
            raise ValueError("train.batch_size * rollout.n must be divisible by train.grad_accum * "
                             "train.mini_batches")

    def setup(self):
        self._flat_steps = 0  # leading steps whose rewards were all equal (``check_signal``)

    # ------------------------------------------------------------------------------ sampling
    def generate(self, rows: list[dict], n: int, round_: int = 0, positions=None):
        """Rollouts of ``rows`` (``n`` each). ``rollout.seed_mode``: ``per_rank``, one batched generate call
        seeded by (train.seed, step, rank, round); ``global``, one call per prompt seeded by (train.seed,
        step, the prompt's index ``positions[i]`` in the global batch, round), so a prompt's rollouts do
        not depend on the rank that holds it or on the number of ranks."""
        c, tr = self.cfg, self.tr
        prompts = [tr.prompt_ids(r) for r in rows]
        kw = dict(n=n, max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                  top_p=c.rollout.top_p)
        tr.engine.wake()
        if c.rollout.seed_mode == "global":
            ro = []
            for i, (p, pos) in enumerate(zip(prompts, positions)):
                ro += [dataclasses.replace(r, prompt_index=i)
                       for r in tr.engine.generate([p], seed=self.sample_seed(pos, round_), **kw)]
        else:
            ro = tr.engine.generate(prompts, seed=self.sample_seed(dist.rank(), round_), **kw)
        tr.engine.sleep()
        return ro

    def sample_seed(self, key: int, round_: int) -> int:
        """The sampling seed of this step for ``key`` (the rank, or a global prompt index) and round."""
        return (self.cfg.train.seed * 1_000_003 + self.tr.step * 7919 + key + round_ * 104_729) % 2**31

    def score(self, rows: list[dict], ro) -> tuple[list[float], dict, list[str]]:
        """Rewards of rollouts ``ro`` of ``rows`` (reward functions + DAPO soft overlong punishment);
        the functions also see completion_ids, completion_length and truncated."""
        c, tr = self.cfg, self.tr
        texts = tr.tok.batch_decode([r.completion_ids for r in ro], skip_special_tokens=True)
        cols = tr.columns_of([rows[r.prompt_index] for r in ro])
        cols.update(completion_ids=[list(r.completion_ids) for r in ro],
                    completion_length=[len(r.completion_ids) for r in ro],
                    truncated=[r.finish_reason == "length" for r in ro])
        reward, per = tr.rewards([prompt_text(rows[r.prompt_index][c.data.prompt_column]) for r in ro],
                                 texts, cols)
        if c.reward.overlong_buffer:
            pen = [soft_overlong_punishment(len(r.completion_ids), c.rollout.max_new_tokens,
                                            c.reward.overlong_buffer, c.reward.overlong_penalty) for r in ro]
            reward = [a + b for a, b in zip(reward, pen)]
            per["overlong_punishment"] = pen
        return reward, per, texts

    def sample_groups(self, n: int):
        """Rows, rollouts and rewards of one RL step. With ``rollout.dynamic_sampling`` (DAPO), groups whose
        rewards are all equal are dropped and more prompts are sampled, at most
        ``rollout.max_sampling_rounds`` generate calls, until ``train.batch_size`` groups are kept.

        At more than one rank every decision is global: each round all ranks take the same prompts from the
        sampler (the groups still missing, rounded up to a multiple of the world size so that every rank
        generates for as many prompts: the ``hf`` engine generates in lock-step), keep their informative
        groups, and the first kept groups of the round in the global order, up to the number missing, are
        the ones trained on (one all-gather of the kept positions per round). So every rank runs the same
        rounds, and the groups of the step, counted over every rank, are at most ``train.batch_size``.
        The ``dropped_groups`` stat counts the groups with equal rewards over every rank."""
        c, tr = self.cfg, self.tr
        want, ws = c.train.batch_size, dist.world_size()
        rows, ro, reward, per, texts = [], [], [], {}, []
        kept = dropped = rounds = 0    # groups kept / dropped over every rank
        while kept < want and rounds < (c.rollout.max_sampling_rounds if c.rollout.dynamic_sampling else 1):
            need = want - kept
            global_rounds = ws > 1 and c.rollout.dynamic_sampling
            taken = tr.sampler.take(-(-need // ws) * ws if global_rounds else need)
            mine = dist.shard_batch(list(range(len(taken))))  # positions in the round's global batch
            new_rows = [tr.train_rows[taken[i]] for i in mine]
            new_ro = self.generate(new_rows, n, rounds, positions=mine)
            rounds += 1
            r_new, per_new, t_new = self.score(new_rows, new_ro)
            keep = (keep_informative_groups(r_new, n) if c.rollout.dynamic_sampling
                    else list(range(len(new_rows))))
            if global_rounds:
                every = sorted(p for part in dist.all_gather_object([mine[g] for g in keep]) for p in part)
                dropped += len(taken) - len(every)
                chosen = set(every[:need])
                keep = [g for g in keep if mine[g] in chosen]
                kept += len(chosen)
            else:   # one process, or one round (no dynamic sampling)
                dropped += len(new_rows) - len(keep)
                kept += len(keep)
            for g in keep:
                gi = len(rows)
                rows.append(new_rows[g])
                for j in range(g * n, (g + 1) * n):
                    ro.append(dataclasses.replace(new_ro[j], prompt_index=gi))
                    reward.append(r_new[j])
                    texts.append(t_new[j])
                    for k, v in per_new.items():
                        per.setdefault(k, []).append(v[j])
        stats = {"sampling_rounds": rounds, "dropped_groups": dropped} if c.rollout.dynamic_sampling else {}
        return rows, ro, reward, per, texts, stats

    def token_advantages(self, ro, per: dict, texts, n: int) -> Optional[list[list[float]]]:
        """Per-token advantages from process rewards (None when every reward is a scalar)."""
        c, tr = self.cfg, self.tr
        steps = tr.rewards.step_scores({k: v for k, v in per.items() if k in tr.rewards.names}, len(ro))
        if steps is None:
            return None
        step_tok = None
        if c.reward.step_token:
            step_tok = tr.tok.convert_tokens_to_ids(c.reward.step_token)
            if step_tok is None or step_tok == tr.tok.unk_token_id:
                raise ValueError(f"reward.step_token {c.reward.step_token!r} is not a token of the tokenizer")
        scores, ends = [], []
        for i, r in enumerate(ro):
            ids = list(r.completion_ids)
            pieces = [tr.tok.decode([t], skip_special_tokens=True) for t in ids]
            e_steps = step_ends(pieces, c.reward.step_delimiter, ids, step_tok) if ids else []
            sc, en = [], []
            for vals, is_list in steps[i]:
                e = e_steps if is_list else ([len(ids) - 1] if ids else [])
                if len(vals) != len(e):
                    raise ValueError(f"a process reward function returned {len(vals)} step scores for a "
                                     f"completion with {len(e)} steps (split by reward.step_token="
                                     f"{c.reward.step_token!r} / step_delimiter={c.reward.step_delimiter!r}): "
                                     f"{texts[i]!r}")
                sc += vals
                en += e
            scores.append(sc)
            ends.append(en)
        if "overlong_punishment" in per:  # a sequence-level term: one step at the end
            for i, r in enumerate(ro):
                if r.completion_ids:
                    scores[i].append(per["overlong_punishment"][i])
                    ends[i].append(len(r.completion_ids) - 1)
        return process_advantages(scores, ends, [len(r.completion_ids) for r in ro], n,
                                  eps=self.tr.loss_cfg.adv_eps)

    # ------------------------------------------------------------------------------ metrics
    def rollout_metrics(self, ro, R, correct, P, use_rl, items) -> dict:
        lens = [len(r.completion_ids) for r in ro] or [0]
        m = dict(reward=float(R.mean()) if R.numel() else 0.0,
                 accuracy=float(correct.mean()) if R.numel() else 0.0,
                 sft_share=float((~use_rl).float().mean()) if len(use_rl) else 0.0,
                 rl_prompts=int(dist.all_reduce_sum(int(use_rl.sum()))),
                 solve_none=float((P == 0).float().mean()) if len(P) else 0.0,
                 solve_all=float((P == 1).float().mean()) if len(P) else 0.0,
                 completion_len=sum(lens) / len(lens),
                 stop_frac=sum(r.finish_reason == "stop" for r in ro) / max(1, len(ro)),
                 tokens=int(dist.all_reduce_sum(sum(s.num_tokens for s in items))),
                 **consumed(sum(len(r.completion_ids) for r in ro), [s for s in items if s.is_demo]))
        for k in ("reward", "accuracy", "sft_share", "solve_none", "solve_all", "completion_len", "stop_frac"):
            m[k] = dist.all_reduce_mean(m[k])
        self.check_signal(R)
        return m

    def no_signal_note(self) -> str:
        """What the method trains on while its rewards carry no signal (the warning's last sentence)."""
        return "the policy gradient is 0 on every step"

    def check_signal(self, R: torch.Tensor) -> None:
        """Warn once when the run's first ``NO_SIGNAL_STEPS`` steps gave every rollout the same reward
        (e.g. 0 from a randomly initialised model): group advantages are then all 0 and nothing is learnt
        from the rewards."""
        if self._flat_steps < 0:   # warned, or a step had a signal
            return
        lo, hi = (float(R.min()), float(R.max())) if R.numel() else (math.inf, -math.inf)
        if dist.is_distributed():  # every rank's rewards (all ranks call this: same steps, same verdict)
            pairs = dist.all_gather_object((lo, hi))
            lo, hi = min(p[0] for p in pairs), max(p[1] for p in pairs)
        flat = lo == hi
        if not flat:
            self._flat_steps = -1
            return
        self._flat_steps += 1
        if self._flat_steps >= NO_SIGNAL_STEPS:
            self._flat_steps = -1
            if dist.is_main():
                path = self.cfg.model.path
                start = (f"model.path={path!r} is a randomly initialised model: " if path == "embedded" else "")
                print(f"[upg-train] warning: every rollout of the first {NO_SIGNAL_STEPS} steps got reward "
                      f"{hi:g}: no learning signal from the rewards ({self.no_signal_note()}). "
                      f"{start}start from a checkpoint that solves some prompts, e.g. an SFT run: "
                      f"`upg-train sft --output.dir runs/sft` then `upg-train {self.name} --model.path "
                      f"runs/sft/final`", flush=True)
