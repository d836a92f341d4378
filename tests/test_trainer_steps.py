"""One training step of sft / grpo / hpt through unified_policy_loss, and HPT's per-prompt gate."""
import math

import pytest
import torch

from trainer_fakes import AnswerEngine, spy  # noqa: F401  (spy: a fixture)
from upg_trainer.config import build_config
from upg_trainer.trainer import Trainer


def make_trainer(tmp_path, command, **flags):
    base = {"output.dir": str(tmp_path / command), "output.progress": "false", "output.plots": "false",
            "data.eval_path": "", "data.num_train": "4", "train.batch_size": "4", "rollout.n": "4",
            "rollout.max_new_tokens": "8", "output.save_every": "0"}
    base.update({k: str(v) for k, v in flags.items()})
    return Trainer(build_config(command, None, base))


def _no_logits(tr):
    def boom(*a, **k):
        raise AssertionError("the trainer asked the model for full logits")
    tr.lm.lm_head.forward = boom


def test_sft_steps_decrease_loss(tmp_path, spy):
    tr = make_trainer(tmp_path, "sft", **{"train.lr": 1e-2})
    _no_logits(tr)
    losses = [tr.train_step()["loss"] for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    c = spy[0]
    assert c["config"].advantage == "one" and c["hidden"].shape[-1] == tr.lm.config.hidden_size
    assert c["weight"] is tr.lm.lm_head.weight   # tied to the embeddings in the tiny model


def test_grpo_step(tmp_path, spy):
    tr = make_trainer(tmp_path, "grpo", **{"train.lr": 1e-2})
    tr.engine = AnswerEngine(tr, correct=[0, 1, 2, 4])
    _no_logits(tr)
    before = [p.detach().clone() for p in tr.lm.parameters()]
    m = tr.train_step()
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert m["reward"] == pytest.approx(7 / 16) and m["sft_share"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.lm.parameters()))
    c = spy[0]
    assert c["targets"].shape[0] == 16 and c.get("is_demo") is None
    adv = c["advantages"].view(4, 4)
    assert torch.all(adv[0] == 0) and torch.all(adv[3] == 0)    # equal rewards: no signal
    assert adv[1, 0] > 0 > adv[1, 1]


@pytest.mark.parametrize("gamma,correct,expect_rl", [
    (0.0, [0, 1, 2, 4], [False, True, True, True]),    # paper gate for Qwen: any success -> RL
    (0.25, [0, 1, 2, 4], [False, False, True, True]),  # Llama gate 2/8 -> P must exceed 0.25
    (0.0, [0, 0, 0, 0], [False, False, False, False]),  # nothing solved: pure SFT
])
def test_hpt_gate(tmp_path, spy, gamma, correct, expect_rl):
    tr = make_trainer(tmp_path, "hpt", **{"hpt.gamma": gamma, "train.lr": 1e-3})
    tr.engine = AnswerEngine(tr, correct=correct)
    _no_logits(tr)
    idx = list(tr.sampler._perm(0))  # the step's prompts, in order
    m = tr.train_step()
    c = spy[0]
    demo = c.get("is_demo")
    demo = torch.zeros(c["targets"].shape[0], dtype=torch.bool) if demo is None else demo.cpu()
    n_rl = sum(expect_rl)
    assert int((~demo).sum()) == 4 * n_rl and int(demo.sum()) == 4 - n_rl
    assert m["sft_share"] == pytest.approx((4 - n_rl) / 4) and m["rl_prompts"] == n_rl
    # the demo rows train on the prompts' demonstrations (+EOS)
    from upg_trainer.data import encode_completion
    demos = [encode_completion(tr.tok, tr.train_rows[i]["demonstration"]) for i, ok in zip(idx, expect_rl)
             if not ok]
    tg = c["targets"][demo]
    for row, d in zip(tg, demos):
        assert row[:len(d)].tolist() == d
    assert math.isfinite(m["loss"])
    assert torch.all(c["advantages"].cpu()[demo] == 0)


def test_hpt_release_preset(tmp_path, spy):
    tr = make_trainer(tmp_path, "hpt", **{"loss.preset": "hpt_release"})
    tr.engine = AnswerEngine(tr, correct=[0, 1, 3, 4])
    m = tr.train_step()
    cfg = spy[0]["config"]
    assert cfg.stabilization == "none" and cfg.advantage == "mean" and cfg.entropy_coef == 0.001
    assert cfg.max_completion_length == 8   # Dr.GRPO normaliser = rollout.max_new_tokens here
    assert math.isfinite(m["loss"]) and m["sft_share"] == 0.25


def test_grad_accum_matches_one_batch(tmp_path):
    """grad_accum=2 gives the same gradient as one micro-batch (the part weights add up)."""
    gs = []
    for ga in (1, 2):
        tr = make_trainer(tmp_path / f"ga{ga}", "hpt", **{"train.grad_accum": ga, "train.grad_clip": 0})
        tr.engine = AnswerEngine(tr, correct=[0, 1, 3, 0])
        tr.train_step()
        gs.append([p.grad.detach().clone() for p in tr.lm.parameters()])
    for a, b in zip(*gs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_real_rollouts_one_step(tmp_path):
    """The default HF engine end to end (random model: rewards 0, HPT falls back to SFT)."""
    tr = make_trainer(tmp_path, "hpt", **{"train.batch_size": 2, "rollout.n": 2})
    m = tr.train_step()
    assert math.isfinite(m["loss"]) and m["sft_share"] == 1.0 and m["completion_len"] > 0


def test_two_mini_batches_use_old_logprobs(tmp_path, spy):
    """mini_batches=2: two updates per rollout batch; the second sees ratio != 1 against pi_old."""
    tr = make_trainer(tmp_path, "grpo", **{"train.mini_batches": 2, "train.lr": 5e-2,
                                            "loss.overrides": "{rollout_is: token_truncate}"})
    tr.engine = AnswerEngine(tr, correct=[1, 2, 3, 1])
    m = tr.train_step()
    assert len(spy) == 2 and all(c["old_logprobs"] is not None for c in spy)
    assert all(c["rollout_logprobs"] is not None for c in spy)
    assert math.isfinite(m["loss"]) and "ratio_mean" in m
    # pi_old of the second mini-batch is the policy before the first update, so its ratio moved off 1
    assert m["ratio_max"] - m["ratio_min"] > 1e-4


def test_cli_user_jsonl_end_to_end(tmp_path):
    """`upg-train sft` then `grpo` then `eval` on a user JSONL with renamed columns and the math reward."""
    import json
    import os

    from upg_trainer import task
    from upg_trainer.cli import main
    rows = [{"question": r["prompt"], "final": r["answer"], "solution": r["demonstration"]}
            for r in task.make_dataset(12, seed=4)]
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = ["--data.path", str(f), "--data.eval_path", str(f), "--data.prompt_column", "question",
            "--data.answer_column", "final", "--data.demo_column", "solution", "--data.num_eval", "4",
            "--output.progress", "false", "--train.max_steps", "2", "--train.batch_size", "2",
            "--rollout.n", "2", "--rollout.max_new_tokens", "6", "--reward.funcs", "[math]",
            "--data.max_prompt_tokens", "12"]
    assert main(["sft", *cols, "--output.dir", str(tmp_path / "sft")]) == 0
    for name in ("metrics.jsonl", "plots.png", "config.yaml", "final/model.safetensors",
                 "final/tokenizer.json", "checkpoints/step-00000002/optimizer.pt"):
        assert os.path.exists(tmp_path / "sft" / name), name
    assert main(["grpo", *cols, "--model.path", str(tmp_path / "sft" / "final"),
                 "--output.dir", str(tmp_path / "grpo")]) == 0
    assert main(["eval", *cols, "--model.path", str(tmp_path / "grpo" / "final"),
                 "--output.dir", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert 0.0 <= m["eval/accuracy"] <= 1.0


class TruncatingEngine(AnswerEngine):
    """AnswerEngine whose rollouts ``truncated`` ((prompt, rollout) pairs) end by length."""

    def __init__(self, tr, correct, truncated):
        super().__init__(tr, correct)
        self.truncated = set(truncated)

    def completion(self, i, prompt_ids, j):
        text, reason = super().completion(i, prompt_ids, j)
        return text, "length" if (i, j) in self.truncated else reason


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo"])
def test_overlong_filtered_rows_grad_accum_independent(tmp_path, preset):
    """rollout.overlong_filter zeroes the mask of truncated rollouts: the gradient must not depend on
    grad_accum (the micro-batches divide by the totals of the whole batch; it used to differ by 14%)."""
    torch.set_default_dtype(torch.float64)
    try:
        gs, ms = [], []
        for ga in (1, 4):
            tr = make_trainer(tmp_path / f"{preset}{ga}", "grpo", **{
                "train.grad_accum": ga, "train.grad_clip": 0, "rollout.overlong_filter": "true",
                "loss.preset": preset})
            tr.lm.double()
            tr.engine = TruncatingEngine(tr, correct=[1, 2, 3, 1], truncated=[(0, 0), (1, 1)])
            m = tr.train_step()
            assert m["overlong_filtered"] == pytest.approx(2 / 16)
            gs.append([p.grad.detach().clone() for p in tr.lm.parameters() if p.grad is not None])
            ms.append(m)
    finally:
        torch.set_default_dtype(torch.float32)
    for key in ("loss", "loss_main"):   # the logged loss and its main part do not depend on grad_accum
        assert ms[0][key] == pytest.approx(ms[1][key], rel=1e-9, abs=1e-12), key
    assert len(gs[0]) == len(gs[1]) > 0
    for a, b in zip(*gs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
