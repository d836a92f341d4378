"""Review fixes: equal micro-batch counts on every rank (padding rows add exactly 0), the logged LR,
sft + mini_batches, hpt_gamma in loss.overrides, rollout_is without sampler log-probs, a failed start
that is not a run, batch_size >= world size, the merged log-prob helper (eval mode)."""
import json
import os

import pytest
import torch

import upg_trainer.distributed as D
from upg_trainer.config import build_config
from upg_trainer.samples import Sample
from upg_trainer.trainer import Trainer

FAST = {"output.progress": "false", "output.plots": "false", "data.eval_path": "", "train.batch_size": "2",
        "rollout.n": "2", "rollout.max_new_tokens": "4", "data.num_train": "8", "output.save_every": "0"}


def make(tmp_path, command, name="out", **kw):
    d = dict(FAST, **{"output.dir": str(tmp_path / name)})
    d.update({k: str(v) for k, v in kw.items()})
    return Trainer(build_config(command, None, d))


def _rows(out, kind="train"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def test_split_gives_exactly_k_chunks():
    for n in range(0, 7):
        for k in range(1, 5):
            ch = Trainer.split(list(range(n)), k)
            assert len(ch) == k and sum(ch, []) == list(range(n))
            assert max(map(len, ch)) - min(map(len, ch)) <= 1


def _params(tr):
    return [p.detach().clone() for p in tr.model.parameters()]


@pytest.mark.parametrize("command", ["sft", "hpt"])
def test_padding_micro_batch_adds_exactly_zero(tmp_path, command):
    """update([real]) and update([real, pad]) give the same loss, metrics and updated weights."""
    trs = [make(tmp_path, command, name=f"{command}{i}", **{"train.lr": "1e-2"}) for i in range(2)]
    tr = trs[0]
    p = tr.prompt_ids(tr.train_rows[0])
    q = tr.tok("the answer is 7", add_special_tokens=False)["input_ids"]
    if command == "sft":
        from upg_trainer.data import build_rows
        micro = lambda t: [(build_rows([p], [q], t.tok.pad_token_id), {})]  # noqa: E731
        pad = lambda t: (t.pad_batch(), {})  # noqa: E731
    else:  # one RL row and one demonstration, then a padding micro-batch
        items = [Sample(p, q, advantage=0.7), Sample(p, q[:3], is_demo=True)]
        micro = lambda t: [t.method.micro(items)]  # noqa: E731
        pad = lambda t: t.method.micro([])  # noqa: E731
    pb, _ = pad(tr)
    assert pb.loss_mask.sum() == 0
    m1 = trs[0].update(micro(trs[0]))
    m2 = trs[1].update(micro(trs[1]) + [pad(trs[1])])
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-7)
    assert set(m1) == set(m2)
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-6, abs=1e-7), k
    for a, b in zip(_params(trs[0]), _params(trs[1])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_logged_lr_is_the_lr_the_step_trained_with(tmp_path):
    tr = make(tmp_path, "sft", **{"train.max_steps": "3", "train.schedule": "linear", "train.lr": "1e-3"})
    assert tr.sched.lr_lambdas[0](3) == 0.0  # schedule sized max_steps (one update per sft step)
    tr.train()
    lrs = [r["lr"] for r in _rows(tr.out)]
    assert lrs == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    # grpo with 2 mini-batches: the step's mean over its two updates (schedule of 2 * max_steps updates)
    tr = make(tmp_path, "grpo", name="g", **{"train.max_steps": "2", "train.schedule": "linear",
                                             "train.lr": "1e-3", "train.mini_batches": "2"})
    tr.train()
    lrs = [r["lr"] for r in _rows(tr.out)]
    assert lrs == pytest.approx([1e-3 * (1 + 3 / 4) / 2, 1e-3 * (2 / 4 + 1 / 4) / 2])


def test_sft_rejects_mini_batches(tmp_path):
    with pytest.raises(ValueError, match="mini_batches is for grpo/hpt"):
        build_config("sft", None, {"train.mini_batches": "2"})


def test_hpt_gamma_override_rejected(tmp_path):
    with pytest.raises(ValueError, match="--hpt.gamma"):
        make(tmp_path, "hpt", **{"loss.overrides": "{hpt_gamma: 0.25}"})


def test_rollout_is_without_sampler_logprobs_raises(tmp_path):
    tr = make(tmp_path, "grpo", **{"loss.overrides": "{rollout_is: token_truncate}"})
    p = tr.prompt_ids(tr.train_rows[0])
    q = [5, 6, 7]
    mb, extra = tr.method.micro([Sample(p, q, advantage=1.0, logprobs=[-0.5, -0.25, -1.0])])  # with log-probs: used as given
    torch.testing.assert_close(extra["rollout_logprobs"][0, :3], torch.tensor([-0.5, -0.25, -1.0]))
    with pytest.raises(ValueError, match="needs the sampler's log-probs.*1 RL row"):
        tr.method.micro([Sample(p, q, advantage=1.0, logprobs=[-0.5, -0.25, -1.0]), Sample(p, q, advantage=1.0)])
    tr2 = make(tmp_path, "hpt", name="h", **{"loss.overrides": "{rollout_is: token_truncate}"})
    tr2.method.micro([Sample(p, q, advantage=1.0, logprobs=[-0.5] * 3), Sample(p, q, is_demo=True)])  # a demo row needs none


def test_failed_start_is_not_a_run(tmp_path):
    (tmp_path / "rw.py").write_text("def boom(prompts, completions, **kw):\n    raise ValueError('nope')\n")
    flags = {"data.eval_path": "embedded", "data.num_eval": "2", "train.max_steps": "1",
             "reward.funcs": f"[{tmp_path / 'rw.py'}:boom]"}
    tr = make(tmp_path, "grpo", **flags)
    with pytest.raises((ValueError, RuntimeError), match="nope"):
        tr.train()  # the step-0 eval raises: config.yaml and an empty metrics.jsonl are left
    assert os.path.exists(os.path.join(tr.out, "config.yaml"))
    flags["reward.funcs"] = "[task]"
    tr = make(tmp_path, "grpo", **flags)  # same dir, no --output.overwrite: not "already holds a run"
    tr.train()
    assert [r["step"] for r in _rows(tr.out)] == [1]
    with pytest.raises(FileExistsError, match="already holds a run"):
        make(tmp_path, "grpo", **flags)  # a logged training step is a run


def test_batch_size_smaller_than_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 2)
    for command in ("sft", "hpt"):
        with pytest.raises(ValueError, match="batch_size=1 is smaller than the world size 2"):
            make(tmp_path, command, name=command, **{"train.batch_size": "1"})
    # the hf engine generates in lock-step across ranks: prompts must split evenly
    with pytest.raises(ValueError, match="batch_size=3 must be a multiple of the world size 2"):
        make(tmp_path, "grpo", name="uneven", **{"train.batch_size": "3"})


def test_old_logprobs_in_eval_mode_and_mode_restored(tmp_path):
    tr = make(tmp_path, "grpo")
    tr.lm.config.attention_dropout = 0.5
    for mod in tr.lm.modules():
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.5
    p = tr.prompt_ids(tr.train_rows[0])
    micro = [tr.method.micro([Sample(p, [5, 6, 7, 8], advantage=1.0)])]
    tr.model.train()
    tr.fill_logprobs(micro, "old_logprobs", tr.model, tr.softcap)
    a = micro[0][1]["old_logprobs"].clone()
    tr.fill_logprobs(micro, "old_logprobs", tr.model, tr.softcap)
    torch.testing.assert_close(micro[0][1]["old_logprobs"], a, atol=0, rtol=0)  # no dropout noise
    assert tr.model.training and all(m.training for m in tr.model.modules())
    tr.model.eval()
    tr.fill_logprobs(micro, "old_logprobs", tr.model, tr.softcap)
    assert not tr.model.training


def test_demo_sft_runs_get_one_mini_batch(tmp_path):
    from upg_trainer.demo import _derive
    cfg = build_config("demo", None, {"train.mini_batches": "2", "rollout.n": "2"})
    assert _derive(cfg, "sft", str(tmp_path / "w")).train.mini_batches == 1
    assert _derive(cfg, "hpt", str(tmp_path / "h")).train.mini_batches == 2
