"""Bad input gives a clear error that names what was wrong (and leaves no partial checkpoint)."""
import json
import os

import pytest

from upg_trainer import task
from upg_trainer.checkpoint import list_checkpoints, save_checkpoint
from upg_trainer.cli import main
from upg_trainer.config import build_config
from upg_trainer.model import get_head, load_model_and_tokenizer
from upg_trainer.trainer import Trainer

FAST = {"output.progress": "false", "output.plots": "false", "data.eval_path": "", "train.batch_size": "2",
        "rollout.n": "2", "rollout.max_new_tokens": "4", "data.num_train": "4"}


def cfg(tmp_path, command, **kw):
    d = dict(FAST, **{"output.dir": str(tmp_path / "out")})
    d.update({k: str(v) for k, v in kw.items()})
    return build_config(command, None, d)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_column(tmp_path, capsys):
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in task.make_dataset(3)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match="no column 'demonstration'"):
        Trainer(cfg(tmp_path, "sft", **{"data.path": f}))
    rc = main(["hpt", "--data.path", f, "--data.eval_path", "", "--output.dir", str(tmp_path / "o2")])
    assert rc == 1 and "no column 'demonstration'" in capsys.readouterr().err


def test_empty_dataset(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        Trainer(cfg(tmp_path, "grpo", **{"data.path": str(f)}))


def test_reward_function_errors(tmp_path):
    (tmp_path / "rw.py").write_text("def bad(prompts, completions, **kw):\n    return [0.0]\n"
                                    "def boom(prompts, completions, **kw):\n    raise ValueError('nope')\n")
    for fn, msg in (("bad", "returned 1 values for 4 completions"), ("boom", "'.*boom' raised ValueError: nope")):
        tr = Trainer(cfg(tmp_path / fn, "grpo", **{"reward.funcs": f"[{tmp_path / 'rw.py'}:{fn}]"}))
        with pytest.raises((ValueError, RuntimeError), match=msg):
            tr.train_step()
    with pytest.raises(ValueError, match="no callable 'missing'"):
        Trainer(cfg(tmp_path / "m", "grpo", **{"reward.funcs": f"[{tmp_path / 'rw.py'}:missing]"}))


def test_model_without_lm_head(tmp_path):
    from transformers import AutoModel
    model, tok, _ = load_model_and_tokenizer("embedded")
    base = AutoModel.from_config(model.config)
    with pytest.raises(ValueError, match="has no lm_head"):
        get_head(base)
    with pytest.raises(ValueError, match="has no lm_head"):
        Trainer(cfg(tmp_path, "sft"), model=base, tokenizer=tok)
    # a logit scale (Cohere's logit_scale, Granite's logits_scaling) is refused; softcapping is supported
    # (tests/test_trainer_softcap.py)
    model.config.logits_scaling = 8.0
    with pytest.raises(ValueError, match="scales its logits"):
        Trainer(cfg(tmp_path / "sc", "sft"), model=model, tokenizer=tok)
    # a config that claims a softcap the model's forward does not apply: caught by the logits check
    model.config.logits_scaling = 1.0
    model.config.final_logit_softcapping = 0.01
    with pytest.raises(ValueError, match="differ from log_softmax"):
        Trainer(cfg(tmp_path / "sc2", "sft"), model=model, tokenizer=tok)


def test_unreadable_checkpoint(tmp_path, capsys):
    c = cfg(tmp_path, "sft", **{"train.max_steps": 2, "output.save_every": 1})
    Trainer(c).train()
    step, path = list_checkpoints(c.output.dir)[-1]
    with open(os.path.join(path, "model", "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    c2 = cfg(tmp_path, "sft", **{"train.max_steps": 3, "output.resume": "true"})
    with pytest.raises(RuntimeError, match=f"checkpoint '.*step-{step:08d}' is unreadable"):
        Trainer(c2)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    c = cfg(tmp_path, "sft", **{"train.max_steps": 1})
    Trainer(c).train()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(cfg(tmp_path, "sft", **{"train.max_steps": 1}))
    Trainer(cfg(tmp_path, "sft", **{"train.max_steps": 1, "output.overwrite": "true"}))


def test_failed_save_leaves_nothing(tmp_path):
    def broken(path):
        os.makedirs(path)
        with open(os.path.join(path, "half.bin"), "wb") as f:
            f.write(b"x")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), 5, model_state={}, save_model_fn=broken, optimizer_state={},
                        trainer_state={})
    assert list_checkpoints(str(tmp_path)) == []
    assert os.listdir(tmp_path / "checkpoints") == []


def test_bad_loss_preset_for_command(tmp_path):
    with pytest.raises(ValueError, match="needs rewards"):
        Trainer(cfg(tmp_path, "sft", **{"loss.preset": "grpo"}))
    with pytest.raises(ValueError, match="hpt, hpt_release"):
        Trainer(cfg(tmp_path / "b", "hpt", **{"loss.preset": "grpo"}))
    with pytest.raises(ValueError, match="unknown preset"):
        Trainer(cfg(tmp_path / "c", "grpo", **{"loss.preset": "nope"}))
