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
