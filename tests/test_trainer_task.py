"""The embedded task, its tokenizer and the reward functions (built-in and TRL-signature user ones)."""
import pytest

from upg_trainer import task
from upg_trainer.rewards import RewardSet, load_reward, math_verify_answer


def test_generation_is_deterministic_and_correct():
    a = task.make_dataset(200, seed=1, levels=(1, 2, 3, 4, 5))
    assert a == task.make_dataset(200, seed=1, levels=(1, 2, 3, 4, 5))
    assert a != task.make_dataset(200, seed=2, levels=(1, 2, 3, 4, 5))
    for r in a:
        assert task.verify(r["demonstration"], r["answer"]) == 1.0
        assert int(r["answer"]) >= 0 and r["level"] in (1, 2, 3, 4, 5)
    assert {r["level"] for r in a} == {1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="levels"):
        task.make_dataset(3, levels=(9,))


def test_verifier():
    assert task.verify("3+4=7. \\boxed{7}", "7") == 1.0
    assert task.verify("\\boxed{ 7 }", "7") == 1.0
    assert task.verify("\\boxed{6} then \\boxed{7}", "7") == 1.0   # last box counts
    assert task.verify("7", "7") == 0.0                               # no box
    assert task.verify("\\boxed{seven}", "7") == 0.0


def test_tokenizer_roundtrip_no_unk():
    tok = task.load_tokenizer()
    for r in task.make_dataset(300, seed=0, levels=(1, 2, 3, 4, 5)):
        for text in (r["prompt"], r["demonstration"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    out = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 cups."}], add_generation_prompt=True,
                                  tokenize=False)
    assert out == "<|user|>Tom has 3 cups.<|assistant|>"


def test_math_verifier():
    assert math_verify_answer("so \\boxed{7}", "7") == 1.0
    assert math_verify_answer("\\boxed{8}", "7") == 0.0
    assert math_verify_answer("no box", "7") == 0.0
    assert math_verify_answer("\\boxed{1,000}", "1000", use_math_verify=False) == 1.0
    assert math_verify_answer("\\boxed{0.50}", "0.5", use_math_verify=False) == 1.0


def test_user_reward_trl_signature(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length_bonus(prompts, completions, answer=None, **kw):\n"
                 "    assert 'level' in kw\n"
                 "    return [None if c == '' else float(len(c) > 3) for c in completions]\n"
                 "def wrong_len(prompts, completions, **kw):\n    return [1.0]\n"
                 "def boom(prompts, completions, **kw):\n    raise KeyError('no such column')\n"
                 "def text(prompts, completions, **kw):\n    return ['x'] * len(completions)\n")
    rs = RewardSet([f"{f}:length_bonus", "task"], [0.5, 1.0])
    total, per = rs(["p", "p", "p"], ["\\boxed{7}", "", "ab"], {"answer": ["7", "7", "7"], "level": [1, 1, 1]})
    assert total == [1.5, 0.0, 0.0] and per[f"{f}:length_bonus"][1] is None
    with pytest.raises(ValueError, match="wrong_len.*returned 1 values for 2 completions"):
        RewardSet([f"{f}:wrong_len"])(["p", "p"], ["a", "b"], {})
    with pytest.raises(RuntimeError, match="boom.*raised KeyError"):
        RewardSet([f"{f}:boom"])(["p"], ["a"], {})
    with pytest.raises(ValueError, match="text.*returned 'x'"):
        RewardSet([f"{f}:text"])(["p"], ["a"], {})
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward(f"{f}:nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_xyz:fn")
    assert load_reward("upg_trainer.task:task_reward") is task.task_reward
