"""Kill -9 a training run mid-way, resume it, and compare with an uninterrupted run.

The resumed run must lose no completed step and duplicate no metrics row: its metrics.jsonl (time
fields aside) and its final weights equal those of a run that was never interrupted.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from upg_trainer.trainer import TIME_KEYS

REWARD = """
def digits(prompts, completions, **kw):
    return [float(sum(ch.isdigit() for ch in c) % 3 == 0) for c in completions]
"""
STEPS = 16


def _cmd(tmp_path, out, *extra):
    return [sys.executable, "-m", "upg_trainer.cli", "grpo", "--output.dir", str(out),
            "--train.max_steps", str(STEPS), "--output.save_every", "3", "--output.eval_every", "4",
            "--train.batch_size", "2", "--rollout.n", "4", "--rollout.max_new_tokens", "6",
            "--data.num_train", "16", "--data.num_eval", "4", "--train.lr", "5e-3",
            "--reward.funcs", f"[{tmp_path / 'rw.py'}:digits]", "--output.progress", "false",
            "--output.plots", "false", "--output.keep_last", "2", *extra]


def _rows(out):
    rows = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows.append({k: v for k, v in r.items() if k not in TIME_KEYS})
    return rows


def _train_steps(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(x)["step"] for x in f if '"train"' in x and x.endswith("\n")]
    except FileNotFoundError:
        return []


def test_sigkill_and_resume(tmp_path):
    (tmp_path / "rw.py").write_text(REWARD)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(tmp_path, ref), check=True, env=env, capture_output=True)

    p = subprocess.Popen(_cmd(tmp_path, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        steps = _train_steps(run)
        if steps and steps[-1] >= 5:   # past the step-3 checkpoint, before the step-6 one (usually)
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = _train_steps(run)[-1]
    assert killed_at < STEPS
    assert not os.path.exists(run / "final")
    # a checkpoint directory left half-written by a kill is only ever a .tmp-* one
    ck = run / "checkpoints"
    (ck / ".tmp-step-00000099-1").mkdir()

    res = subprocess.run(_cmd(tmp_path, run, "--resume"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout
    assert not any(n.startswith(".tmp") for n in os.listdir(ck))

    a, b = _rows(ref), _rows(run)
    assert [r["step"] for r in b] == [r["step"] for r in a]          # no step lost, none twice
    assert [r["step"] for r in b if r["kind"] == "train"] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
            else:
                assert rb[k] == ra[k], (ra["step"], k)
    wa = load_file(str(ref / "final" / "model.safetensors"))
    wb = load_file(str(run / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
    # the weights really moved during training (the comparison is not vacuous)
    first = load_file(str(sorted((ck).iterdir())[0] / "model" / "model.safetensors"))
    assert any(not torch.equal(first[k], wa[k]) for k in wa)


# ------------------------------------------------------------------ what --resume refuses, warns, applies
from upg_trainer.checkpoint import list_checkpoints, read_metrics  # noqa: E402
from upg_trainer.cli import main  # noqa: E402
from upg_trainer.config import build_config  # noqa: E402
from upg_trainer.trainer import Trainer  # noqa: E402

FAST = {"output.progress": "false", "output.plots": "false", "data.eval_path": "", "train.batch_size": "2",
        "data.num_train": "8", "output.save_every": "1", "train.max_steps": "2"}


def _cfg(out, command="sft", **kw):
    return build_config(command, None, {**FAST, "output.dir": str(out), **{k: str(v) for k, v in kw.items()}})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 2-step sft run (checkpoints at steps 1 and 2); tests copy it."""
    out = tmp_path_factory.mktemp("run") / "sft"
    Trainer(_cfg(out)).train()
    return out


def _copy(run, tmp_path):
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_resume_without_a_run_refuses(tmp_path, capsys):
    missing = tmp_path / "typo"
    rc = main(["sft", "--output.dir", str(missing), "--resume", "--output.progress", "false"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist, so there is no run to resume" in err and "--output.dir" in err
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume .*it holds no checkpoint"):
        Trainer(_cfg(empty, **{"output.resume": "true"}))


def test_resume_without_checkpoint_keeps_metrics(sft_run, tmp_path):
    run = _copy(sft_run, tmp_path)
    import shutil
    shutil.rmtree(run / "checkpoints")
    before = (run / "metrics.jsonl").read_text()
    assert len([r for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "train"]) == 2
    with pytest.raises(FileNotFoundError, match="logs 2 training steps but no checkpoint"):
        Trainer(_cfg(run, **{"output.resume": "true", "train.max_steps": 4}))
    assert (run / "metrics.jsonl").read_text() == before       # never truncated
    # --resume --overwrite: resume if there is a checkpoint, else start over (explicitly allowed)
    tr = Trainer(_cfg(run, **{"output.resume": "true", "output.overwrite": "true"}))
    assert tr.step == 0 and read_metrics(str(run / "metrics.jsonl")) == []


def test_resume_refuses_another_method(sft_run, tmp_path):
    run = _copy(sft_run, tmp_path)
    with pytest.raises(ValueError, match="holds a `upg-train sft` run; `upg-train grpo` cannot continue it"):
        Trainer(_cfg(run, "grpo", **{"output.resume": "true"}))


def test_resume_settings(sft_run, tmp_path, capsys):
    run = _copy(sft_run, tmp_path)
    # refused: a setting that would make one run of two configurations
    with pytest.raises(ValueError, match=r"data.num_train: 8 -> 16; loss.preset: '' -> 'dft'"):
        Trainer(_cfg(run, **{"output.resume": "true", "data.num_train": 16, "loss.preset": "dft"}))
    capsys.readouterr()
    # ignored with a warning (the optimizer state wins), applied (more steps), both named
    tr = Trainer(_cfg(run, **{"output.resume": "true", "train.lr": 5e-4, "train.max_steps": 3,
                              "output.eval_every": 1}))
    out = capsys.readouterr().out
    assert "resuming from" in out and tr.step == 2
    assert "warning: --resume ignores these changed settings" in out
    assert "train.lr: 0.001 -> 0.0005 (kept from the optimizer and LR scheduler state)" in out
    assert "applied from step 3 on: train.max_steps: 2 -> 3; output.eval_every: 0 -> 1" in out
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(1e-3)   # what the warning says
    tr.train()
    assert tr.step == 3 and [s for s, _ in list_checkpoints(str(run))][-1] == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["lr"] == 1e-3   # what the run really used
