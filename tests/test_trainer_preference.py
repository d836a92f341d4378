"""upg-train rm / dpo / ppo on the embedded task: each improves its own metric, resumes exactly, and
refuses bad preference data with a clear error.

The pairs are the embedded task's prompts with chosen = the worked solution and rejected = the same
solution without its boxed answer (a format preference a random-init tiny model learns in a few
steps; the correct-vs-wrong-result pairs of ``data.path embedded`` need an SFT'd model, see the
preference demo)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from upg_trainer.checkpoint import read_metrics
from upg_trainer.config import build_config
from upg_trainer.task import make_dataset
from upg_trainer.trainer import TIME_KEYS, Trainer


def pairs_file(path, n=400, seed=0):
    rows = make_dataset(n, seed=seed, levels=(1,))
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "chosen": r["demonstration"],
                                "rejected": r["demonstration"].split(" \\boxed")[0]}) + "\n")
    return str(path)


def flags(out, **kw):
    base = {"output.dir": str(out), "output.progress": "false", "output.plots": "false", "output.save_every": "0",
            "data.num_eval": "32", "data.eval_fraction": "0.1"}
    base.update({k: str(v) for k, v in kw.items()})
    return base


def run(command, out, **kw):
    tr = Trainer(build_config(command, None, flags(out, **kw)))
    tr.train()
    return tr, read_metrics(str(out / "metrics.jsonl"))


def evals(rows, key):
    return [r[key] for r in rows if r.get("kind") == "eval" and key in r]


def test_rm_learns_pairs_and_scores_as_reward(tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    tr, rows = run("rm", tmp_path / "rm", **{"data.path": data, "train.max_steps": 8, "train.batch_size": 8,
                                             "train.lr": 3e-3})
    acc, margin = evals(rows, "eval/pair_accuracy"), evals(rows, "eval/reward_margin")
    # (a random head may already rank the pairs by their different last tokens: the margin must grow)
    assert acc[-1] >= 0.9 and margin[-1] > margin[0] + 0.5, (acc, margin)
    # the checkpoint is a reward function for grpo/ppo: rm:PATH scores chosen above rejected
    from upg_trainer.rewards import load_reward
    fn = load_reward(f"rm:{tmp_path / 'rm' / 'final'}")
    r = [json.loads(x) for x in open(data)][:8]
    s_c = fn([x["prompt"] for x in r], [x["chosen"] for x in r])
    s_r = fn([x["prompt"] for x in r], [x["rejected"] for x in r])
    assert sum(a > b for a, b in zip(s_c, s_r)) >= 7


def test_dpo_improves_reward_accuracy_and_margin(tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    tr, rows = run("dpo", tmp_path / "dpo", **{"data.path": data, "train.max_steps": 8, "train.batch_size": 8,
                                               "train.lr": 3e-3, "pref.overrides": "{beta: 0.5}"})
    acc, margin = evals(rows, "eval/pair_accuracy"), evals(rows, "eval/reward_margin")
    assert margin[0] == 0.0 and margin[-1] > 0.5, margin       # policy == reference at step 0
    assert acc[-1] >= 0.9, acc
    assert tr.ref is not None and not any(p.requires_grad for p in tr.ref.parameters())


def test_ppo_with_critic_raises_return(tmp_path):
    rw = tmp_path / "digits.py"
    rw.write_text("def digits(prompts, completions, **kw):\n"
                  "    return [sum(ch.isdigit() for ch in c) / 6 for c in completions]\n")
    common = {"reward.funcs": f"[{rw}:digits]", "data.eval_path": "", "train.batch_size": 4, "rollout.n": 4,
              "rollout.max_new_tokens": 6, "train.lr": 1e-2, "ppo.kl_coef": 0.01, "data.num_train": 64}
    tr, rows = run("ppo", tmp_path / "separate", **common, **{"train.max_steps": 12})
    tr_rows = [r for r in rows if r["kind"] == "train"]
    first = sum(r["reward"] for r in tr_rows[:3]) / 3
    last = sum(r["reward"] for r in tr_rows[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert all("vf_loss" in r and "kl_coef" in r and "critic/loss" in r for r in tr_rows)
    assert (tmp_path / "separate" / "final" / "critic" / "value_head.safetensors").exists()
    # the value head on the policy trunk: trained with the policy (its loss in the same backward)
    tr, rows = run("ppo", tmp_path / "shared", **common, **{"train.max_steps": 2, "ppo.critic": "shared"})
    assert tr.method.critic is None and float(tr.method.value_head.weight.detach().abs().sum()) > 0   # moved from its zero init
    assert all("vf_loss" in r for r in rows if r["kind"] == "train")
    final = load_file(str(tmp_path / "shared" / "final" / "model.safetensors"))
    assert not any(k.startswith("upg_value_head") for k in final)
    assert (tmp_path / "shared" / "final" / "value_head.safetensors").exists()


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_metrics(str(out / "metrics.jsonl"))]


def _assert_same_run(a, b):
    # every train row, and the final eval (the interrupted run also evaluated at its last step, 2)
    ra, rb = _rows(a), _rows(b)
    ta, tb = [r for r in ra if r["kind"] == "train"], [r for r in rb if r["kind"] == "train"]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == [1, 2, 3, 4]
    for x, y in zip(ta + [ra[-1]], tb + [rb[-1]]):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
            else:
                assert y[k] == x[k], (x["step"], k)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("command", ["rm", "dpo", "ppo"])
def test_resume_equals_uninterrupted(tmp_path, command):
    extra = {"train.batch_size": 4, "output.save_every": 2, "output.eval_every": 0}
    if command == "ppo":
        rw = tmp_path / "digits.py"
        rw.write_text("def digits(prompts, completions, **kw):\n"
                      "    return [sum(ch.isdigit() for ch in c) / 6 for c in completions]\n")
        extra.update({"reward.funcs": f"[{rw}:digits]", "data.eval_path": "", "rollout.n": 2,
                      "rollout.max_new_tokens": 5, "data.num_train": 16, "ppo.adaptive_kl": "true",
                      "train.batch_size": 2, "train.mini_batches": 2})
    else:
        extra["data.path"] = pairs_file(tmp_path / "pairs.jsonl", n=40)
    run(command, tmp_path / "full", **extra, **{"train.max_steps": 4})
    run(command, tmp_path / "part", **extra, **{"train.max_steps": 2})
    run(command, tmp_path / "part", **extra, **{"train.max_steps": 4, "output.resume": "true"})
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_bad_preference_data_is_refused(tmp_path):
    def make(rows, name="d.jsonl", **kw):
        p = rows if isinstance(rows, str) else _write(tmp_path / name, rows)
        return lambda: Trainer(build_config("dpo", None, flags(tmp_path / "o", **{"data.path": p}, **kw)))
    with pytest.raises(ValueError, match="no column 'rejected'"):
        make([{"prompt": "a", "chosen": "b"}])()
    with pytest.raises(ValueError, match="row 1: column 'chosen' is empty"):
        make([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": " ", "rejected": "c"}])()
    with pytest.raises(ValueError, match="row 0: column 'rejected' is missing or null"):
        make([{"prompt": "a", "chosen": "b", "rejected": None}])()
    col = tmp_path / "cols.json"
    col.write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z"]}))
    with pytest.raises(ValueError, match="length mismatch"):
        make(str(col))()
    with pytest.raises(ValueError, match="column 'chosen' must be a string or a list of chat messages"):
        make([{"prompt": "a", "chosen": 3, "rejected": "c"}])()
    with pytest.raises(ValueError, match="unknown preference preset"):
        make([{"prompt": "a", "chosen": "b", "rejected": "c"}], **{"pref.preset": "nope"})()
    # chat-message completions (TRL's conversational format) are accepted
    tr = make([{"prompt": [{"role": "user", "content": "Tom has 3 apples."}],
                "chosen": [{"role": "assistant", "content": "3"}],
                "rejected": [{"role": "assistant", "content": "4"}]}] * 4, name="chat.jsonl")()
    p, c, r = tr.method.pair_ids(tr.train_rows[0])
    assert c[-1] == r[-1] == tr.tok.eos_token_id and c != r


def test_preference_demo_smoke_and_one_colour_per_method(tmp_path, monkeypatch):
    from upg_trainer import plots
    from upg_trainer.demo import run_demo
    figs = []
    real_save = plots._save

    def keep(plt, fig, title, path):
        figs.append([(ax.get_title(), {ln.get_label(): ln.get_color() for ln in ax.lines}) for ax in fig.axes])
        return real_save(plt, fig, title, path)
    monkeypatch.setattr(plots, "_save", keep)
    cfg = build_config("demo", None, {"output.dir": str(tmp_path / "d"), "output.progress": "false",
                                      "output.plots": "false", "demo.suite": "preference", "demo.warmup_steps": "2",
                                      "demo.pref_steps": "2", "demo.rm_steps": "2", "data.num_eval": "4", "demo.max_new_tokens": "6",
                                      "data.num_train": "64"})
    rows = run_demo(cfg)
    assert [r["steps"] for r in rows] == [2, 2, 2, 2, 2, 2]
    table = (tmp_path / "d" / "demo.md").read_text()
    assert table.count("\n| ") == 6 and (tmp_path / "d" / "demo.png").exists()
    env = json.loads((tmp_path / "d" / "demo.json").read_text())["environment"]
    assert env["threads"] >= 1 and "torch" in env
    colours = {}
    for _title, lines in figs[-1]:
        for label, col in lines.items():
            assert colours.setdefault(label, col) == col, (label, colours[label], col)
    assert len(set(colours.values())) == len(colours) == 5   # dpo, dpo+nll, rm, ppo, ppo control


def test_rm_from_a_sequence_classification_model(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from upg_trainer.model import ASSETS
    from upg_trainer.task import load_tokenizer
    tok = load_tokenizer()
    cfg = AutoConfig.for_model(**dict(json.load(open(f"{ASSETS}/tiny_qwen2.json")), num_labels=1,
                                      pad_token_id=tok.pad_token_id))
    cfg.architectures = ["Qwen2ForSequenceClassification"]
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_config(cfg)
    m.save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    data = pairs_file(tmp_path / "pairs.jsonl", n=40)
    tr, rows = run("rm", tmp_path / "rm", **{"data.path": data, "model.path": tmp_path / "cls",
                                             "train.max_steps": 2, "train.batch_size": 4})
    assert type(tr.lm.lm).__name__ == "Qwen2ForSequenceClassification" and tr.lm.head is tr.lm.lm.score
    assert len([r for r in rows if r["kind"] == "train"]) == 2
    w0 = m.score.weight.detach()
    assert not torch.equal(tr.lm.head.weight.detach().cpu(), w0)   # its own score head was trained
    from upg_trainer.rewards import load_reward   # its checkpoint is an rm:PATH reward too
    fn = load_reward(f"rm:{tmp_path / 'rm' / 'final'}")
    r = [json.loads(x) for x in open(data)][:2]
    s = fn([x["prompt"] for x in r], [x["chosen"] for x in r])
    ref = tr.lm.eval()
    from upg_trainer.data import encode_completion, encode_prompt
    from upg_trainer.value_model import sequence_scores
    want = sequence_scores(ref, [encode_prompt(tr.tok, x["prompt"]) + encode_completion(tr.tok, x["chosen"])
                                 for x in r], tr.tok.pad_token_id, tr.device)
    assert s == pytest.approx(want.tolist(), abs=1e-5)
