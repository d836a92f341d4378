"""The trainer at 2 gloo processes (DDP, CPU) equals the 1-process run on the same global batch.

GRPO and HPT on the embedded task (its tiny model, float32), a few steps with the real HF rollout engine
and ``rollout.seed_mode global`` (each prompt's sampling seeded by its index in the global batch, so a
prompt gets the same rollouts whichever rank holds it). Each rank holds half of the prompts and splits its
rollouts into its own micro-batches; the losses divide by ``batch_totals`` over both ranks (times the world
size that DDP's gradient averaging divides by), so the update, and the weights after it, must equal the
1-process run's. The reward is deterministic in the completion (its length's parity), so GRPO has
non-zero advantages and HPT's gate mixes RL prompts and demonstrations.

Tolerance: the run is float64 (model.dtype float64), per tensor max |w2 - w1| <= 1e-10 * max(1, max |w1|)
(the largest update is about 2e-3 = 2 steps x lr), and the logged loss and gradient norm of every step
within 1e-10 relative, the rewards equal. DDP's all-reduce sums the ranks' gradients in another order than
one process; in float32 that rounding (about 1e-7 relative) reaches the weights as gaps of 1e-6 to 2e-5,
because AdamW's first steps divide each gradient coordinate by its own magnitude (a near-zero coordinate's
rounding becomes a sizeable share of lr), so float32 cannot show exactness at a tight tolerance. A
normalisation error (a micro-batch or rank divided by its own counts) moves the update by O(lr).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from _spawn import run_world  # noqa: E402

STEPS = 2
DTYPE = "float64"
ATOL = 1e-10   # times max(1, max |w|) of the tensor

REWARD = '''
def parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]
'''


def _flags(command: str, out: str, reward: str, world: int, dtype: str = DTYPE, **extra) -> dict:
    return {**{"output.dir": out, "output.progress": "false", "output.plots": "false", "output.save_every": "0",
            "data.eval_path": "", "data.num_train": "16", "train.batch_size": "4", "rollout.n": "2",
            "rollout.max_new_tokens": "6", "train.max_steps": str(STEPS), "train.grad_accum": "2",
            "train.lr": "1e-3", "train.grad_clip": "0", "rollout.seed_mode": "global",
            "reward.funcs": f"[{reward}:parity]", "train.strategy": "ddp" if world > 1 else "none",
            "model.dtype": dtype}, **extra}


def _worker(rank: int, world: int, command: str, tmp: str, reward: str, tag: str = "", dtype: str = DTYPE,
            extra: dict | None = None) -> dict:
    """One run; its final weights go to ``{command}-{world}{tag}.pt`` in ``tmp``."""
    from upg_trainer import distributed as D
    from upg_trainer.config import build_config
    from upg_trainer.trainer import Trainer
    name = f"{command}-{world}{tag}"
    tr = Trainer(build_config(command, None, _flags(command, os.path.join(tmp, name), reward, world, dtype,
                                                   **(extra or {}))))
    tr.train()
    sd = D.full_state_dict(tr.model)
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, os.path.join(tmp, f"{name}.pt"))
    rows = [l for l in open(tr.metrics.path)] if rank == 0 else []
    return {"metrics": rows}


@pytest.mark.parametrize("command", ["grpo", "hpt"])
def test_two_processes_equal_one(tmp_path, command):
    reward = tmp_path / "reward_parity.py"
    reward.write_text(REWARD)
    one = run_world(_worker, 1, command, str(tmp_path), str(reward))
    two = run_world(_worker, 2, command, str(tmp_path), str(reward))
    w1 = torch.load(tmp_path / f"{command}-1.pt")
    w2 = torch.load(tmp_path / f"{command}-2.pt")
    assert set(w1) == set(w2)
    from upg_trainer.config import build_config  # the initial weights: the run must have moved them
    from upg_trainer.trainer import Trainer
    tr0 = Trainer(build_config(command, None, dict(_flags(command, str(tmp_path / "init"), str(reward), 1),
                                                   **{"train.max_steps": "0"})))
    init = {k: v.detach().clone() for k, v in tr0.lm.state_dict().items()}
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1)
    assert moved > 1e-4, "the 1-process run did not change the weights"
    worst = 0.0
    for k in w1:
        gap = float((w2[k] - w1[k]).abs().max())
        scale = max(1.0, float(w1[k].abs().max()))
        worst = max(worst, gap / scale)
        assert gap <= ATOL * scale, f"{command} {k}: 2 processes differ from 1 by {gap:.3e} (scale {scale:.3g})"
    print(f"{command}: max weight gap 2 vs 1 process {worst:.2e} (largest update {moved:.2e})")
    # the same rollouts: the logged rewards of every step agree
    import json
    m1 = [json.loads(x) for x in one[0]["metrics"] if '"train"' in x]
    m2 = [json.loads(x) for x in two[0]["metrics"] if '"train"' in x]
    assert len(m1) == len(m2) == STEPS
    for a, b in zip(m1, m2):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10, abs=1e-12)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)
        if command == "hpt":
            assert a["sft_share"] == pytest.approx(b["sft_share"], abs=1e-12)
    if command == "hpt":   # the gate mixed RL prompts and demonstrations in some step
        assert any(0.0 < a["sft_share"] < 1.0 for a in m1), [a["sft_share"] for a in m1]


def test_seed_mode_is_checked():
    from upg_trainer.config import build_config
    with pytest.raises(ValueError, match="rollout.seed_mode must be one of per_rank, global"):
        build_config("grpo", None, {"rollout.seed_mode": "rank"})


# ----------------------------------------------------------------------------- DAPO dynamic sampling at 2 ranks
def _dynamic_sampling_worker(rank: int, world: int, tmp: str, reward: str) -> dict:
    """A 2-process grpo run with ``rollout.dynamic_sampling``; records what each rank's sampling did."""
    from upg_trainer.methods.rl import RLMethod
    seen = []
    orig = RLMethod.sample_groups

    def recording(self, n):
        pos = self.tr.sampler.pos
        rows, ro, reward_, per, texts, stats = orig(self, n)
        seen.append(dict(stats, groups=len(rows), taken=self.tr.sampler.pos - pos,
                         flat=sum(len(set(reward_[g * n:(g + 1) * n])) == 1 for g in range(len(rows)))))
        return rows, ro, reward_, per, texts, stats
    RLMethod.sample_groups = recording
    out = _worker(rank, world, "grpo", tmp, reward, "-ds", "float32",
                  {"rollout.dynamic_sampling": "true", "rollout.max_sampling_rounds": "4", "train.max_steps": "3"})
    return dict(out, seen=seen)


def test_dynamic_sampling_decides_over_every_rank(tmp_path):
    """Every rank runs the same rounds and takes the same prompts; the kept groups over both ranks fill the
    batch (4 prompts) unless the round cap was reached; no kept group has equal rewards; the logged
    ``dropped_groups`` / ``sampling_rounds`` are the global ones (the same on both ranks)."""
    reward = tmp_path / "reward_parity.py"
    reward.write_text(REWARD)
    res = run_world(_dynamic_sampling_worker, 2, str(tmp_path), str(reward))
    a, b = res[0]["seen"], res[1]["seen"]
    assert len(a) == len(b) == 3
    multi = 0
    for sa, sb in zip(a, b):
        for k in ("sampling_rounds", "dropped_groups", "taken"):
            assert sa[k] == sb[k], (k, sa, sb)
        total = sa["groups"] + sb["groups"]
        assert total == 4 or (total < 4 and sa["sampling_rounds"] == 4), (sa, sb)
        assert sa["flat"] == sb["flat"] == 0, (sa, sb)
        multi += sa["sampling_rounds"] > 1
    assert multi, f"no step needed a second round: {a}"   # the refill ran
    print("dynamic sampling, rank 0 then rank 1:", a, b)
