"""DAPO sampling (dynamic sampling, overlong filtering, soft overlong punishment), SFT replay mixing
and the process-reward -> per-token advantage mapping."""
import json
import math

import pytest
import torch

from trainer_fakes import ScriptedEngine, spy  # noqa: F401  (spy: a fixture)
from upg_trainer.config import build_config
from upg_trainer.samples import keep_informative_groups, process_advantages, soft_overlong_punishment, step_ends
from upg_trainer.trainer import Trainer


def make_trainer(tmp_path, command, **flags):
    base = {"output.dir": str(tmp_path / command), "output.progress": "false", "output.plots": "false",
            "data.eval_path": "", "data.num_train": "8", "train.batch_size": "2", "rollout.n": "2",
            "rollout.max_new_tokens": "6", "output.save_every": "0"}
    base.update({k: str(v) for k, v in flags.items()})
    return Trainer(build_config(command, None, base))


# ------------------------------------------------------------------------------------ unit
def test_soft_overlong_punishment_formula():
    # DAPO eq. 13 with L_max = 20, L_cache = 4: free up to 16, linear to -1 at 20, -1 beyond
    assert soft_overlong_punishment(10, 20, 4) == 0.0
    assert soft_overlong_punishment(16, 20, 4) == 0.0
    assert soft_overlong_punishment(18, 20, 4) == pytest.approx(-0.5)
    assert soft_overlong_punishment(20, 20, 4) == pytest.approx(-1.0)
    assert soft_overlong_punishment(21, 20, 4, penalty=2.0) == -2.0
    assert soft_overlong_punishment(30, 20, 0) == 0.0  # off


def test_keep_informative_groups():
    assert keep_informative_groups([1, 1, 0, 1, 0, 0, 0.5, 0.5], 2) == [1]
    assert keep_informative_groups([1, 0, 1, 1], 2) == [0]
    with pytest.raises(ValueError, match="groups of n=3"):
        keep_informative_groups([1, 0], 3)


def test_step_ends_delimiter_and_token():
    pieces = ["a", "=", "1", "\n", "b", "=", "2", "\n", "c", "<eos>"]
    assert step_ends(pieces, "\n") == [3, 7, 9]       # the tail "c<eos>" is a step, ending at the last token
    assert step_ends(pieces[:8], "\n") == [3, 7]      # nothing after the last delimiter: no extra step
    assert step_ends(["x. ", "y. ", "z"], ". ") == [0, 1, 2]
    ids = [5, 9, 5, 9, 5]
    assert step_ends([""] * 5, token_ids=ids, step_token_id=9) == [1, 3, 4]
    assert step_ends([], "\n") == []


def test_process_advantages_matches_hand_computation():
    # a group of two completions: steps (r=1 at t=1, r=0 at t=3) and (r=1 at t=2)
    scores, ends, lens = [[1.0, 0.0], [1.0]], [[1, 3], [2]], [4, 3]
    adv = process_advantages(scores, ends, lens, group_size=2, eps=0.0)
    flat = [1.0, 0.0, 1.0]
    mu = sum(flat) / 3
    sd = math.sqrt(sum((x - mu) ** 2 for x in flat) / 2)
    z = [(x - mu) / sd for x in flat]
    assert adv[0] == pytest.approx([z[0] + z[1], z[0] + z[1], z[1], z[1]])
    assert adv[1] == pytest.approx([z[2]] * 3)
    # one step per completion = GRPO's outcome advantage on every token
    o = process_advantages([[1.0], [0.0]], [[1], [2]], [2, 3], group_size=2, eps=0.0)
    from upg_kernels import group_advantages
    g = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, mode="mean_std", eps=0.0).tolist()
    assert o[0] == pytest.approx([g[0]] * 2) and o[1] == pytest.approx([g[1]] * 3)
    with pytest.raises(ValueError, match="2 step rewards for 1 steps"):
        process_advantages([[1.0, 2.0], [0.0]], [[1], [1]], [2, 2], group_size=2)


# ------------------------------------------------------------------------------- trainer
def test_dynamic_sampling_drops_equal_groups_and_caps(tmp_path, spy):
    rw = tmp_path / "has1.py"
    rw.write_text("def has1(prompts, completions, **kw):\n    return [float('1' in c) for c in completions]\n")
    tr = make_trainer(tmp_path, "grpo", **{"rollout.dynamic_sampling": "true", "rollout.max_sampling_rounds": 3,
                                           "reward.funcs": f"[{rw}:has1]"})

    def script(k, j):  # prompts 0, 1, 3 get all-equal rewards (dropped), prompt 2 and 4+ are mixed
        return ("\\boxed{1}" if (k in (2,) or k >= 4) and j == 0 else "\\boxed{x}"), "stop"
    tr.engine = ScriptedEngine(tr, script)
    m = tr.train_step()
    # round 1: prompts 0,1 (both dropped); round 2: prompts 2,3 (2 kept); round 3: one prompt (kept)
    assert tr.engine.calls == [2, 2, 1]
    assert m["sampling_rounds"] == 3 and m["dropped_groups"] == 3
    assert sum(c["targets"].shape[0] for c in spy) == 4     # 2 groups x n=2 rows trained
    # the cap: every group equal -> max_sampling_rounds calls, then the step trains on what it has (nothing)
    tr2 = make_trainer(tmp_path / "b", "grpo", **{"rollout.dynamic_sampling": "true",
                                                   "rollout.max_sampling_rounds": 2, "reward.funcs": f"[{rw}:has1]"})
    tr2.engine = ScriptedEngine(tr2, lambda k, j: ("\\boxed{x}", "stop"))
    m2 = tr2.train_step()
    assert tr2.engine.calls == [2, 2] and m2["dropped_groups"] == 4 and m2["sampling_rounds"] == 2


def test_overlong_filter_and_punishment_and_reward_columns(tmp_path, spy):
    rw = tmp_path / "rw.py"
    rw.write_text("SEEN = {}\n"
                  "def f(prompts, completions, completion_length=None, truncated=None, completion_ids=None, **kw):\n"
                  "    SEEN['len'] = list(completion_length); SEEN['trunc'] = list(truncated)\n"
                  "    return [1.0 if not t else 0.0 for t in truncated]\n")
    tr = make_trainer(tmp_path, "grpo", **{"rollout.overlong_filter": "true", "reward.overlong_buffer": 3,
                                           "reward.funcs": f"[{rw}:f]"})
    tr.engine = ScriptedEngine(tr, lambda k, j: ("123456", "length") if j == 1 else ("1", "stop"))
    m = tr.train_step()
    mod = tr.rewards.funcs[0].__globals__["SEEN"]
    assert mod["trunc"] == [False, True, False, True]
    assert mod["len"][0] == 2 and mod["len"][1] == 6     # '1' + EOS; six digit tokens (no EOS)
    mask = torch.cat([c["loss_mask"] for c in spy])
    assert (mask[1] == 0).all() and (mask[3] == 0).all() and mask[0].sum() == 2  # truncated rows masked out
    assert m["overlong_filtered"] == pytest.approx(0.5)
    # reward = verifier (1 / 0) + punishment: 0 for length 2, -1 at max_new_tokens=6 (buffer 3)
    assert m["reward"] == pytest.approx((1 + 0 - 1 + 1 + 0 - 1) / 4)


def test_process_rewards_train_per_token_advantages(tmp_path, spy):
    rw = tmp_path / "prm.py"
    rw.write_text("def steps(prompts, completions, **kw):\n"
                  "    return [[1.0 if '1' in s else 0.0 for s in c.split('.')[:c.count('.') + (0 if c.endswith('.') else 1)]]\n"
                  "            for c in completions]\n")
    tr = make_trainer(tmp_path, "grpo", **{"reward.funcs": f"[{rw}:steps]", "reward.step_delimiter": "."})
    tr.engine = ScriptedEngine(tr, lambda k, j: ("1.2.", "stop") if j == 0 else ("2.1.", "stop"))
    tr.train_step()
    adv = torch.cat([c["advantages"] for c in spy])
    assert adv.dim() == 2
    # "1.2." + EOS = 5 tokens, steps end at t=1 ("1.") and t=4 ("2." + EOS): scores [1, 0]; "2.1." the reverse
    want = process_advantages([[1.0, 0.0], [0.0, 1.0]], [[1, 4], [1, 4]], [5, 5], 2, eps=tr.loss_cfg.adv_eps)
    for row in range(4):
        assert adv[row, :5].tolist() == pytest.approx(want[row % 2], abs=1e-5)
    assert adv[0, 0] == pytest.approx(0.0, abs=1e-5) and adv[0, 4] < 0 < adv[1, 4]   # z(1) + z(0) = 0


def test_replay_rows_mixed_into_sft_batches(tmp_path, spy):
    rp = tmp_path / "replay.jsonl"
    rp.write_text("\n".join(json.dumps({"text": t}) for t in ["Tom has 3 apples.", "Ann buys 4 pens.",
                                                                "How many cups are there?"]) + "\n")
    tr = make_trainer(tmp_path, "sft", **{"data.replay_path": str(rp), "data.replay_ratio": 0.5,
                                          "train.batch_size": 4, "data.packing": "false"})
    m = tr.train_step()
    assert m["replay_share"] == 0.5
    tg = spy[0]["targets"]
    assert tg.shape[0] == 4
    replay_rows = [tr.tok.decode([t for t in row.tolist() if t >= 0]) for row in tg[2:]]
    for txt in replay_rows:  # every token after the first (+ EOS) is a target: the all-token LM loss
        assert any(txt.startswith(src.split(" ", 1)[1][:5]) or src.endswith(txt.replace("<|end|>", "")[-8:])
                   for src in ["Tom has 3 apples.", "Ann buys 4 pens.", "How many cups are there?"])
    ids = tr.tok("Tom has 3 apples.", add_special_tokens=False)["input_ids"]
    s = tr.method.replay.sample(tr.method.replay.rows.index({"text": "Tom has 3 apples."}))
    assert s.prompt_ids == ids[:1] and s.completion_ids == ids[1:] + [tr.tok.eos_token_id]
    with pytest.raises(ValueError, match="replay_ratio > 0 needs data.replay_path"):
        build_config("sft", None, {"data.replay_ratio": "0.2"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'"):
        make_trainer(tmp_path / "b", "sft", **{"data.replay_path": str(bad), "data.replay_ratio": 0.5})
