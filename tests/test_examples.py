"""The example configs load through the trainer's config loader and encode the HPT paper's setup;
the example scripts run end to end on CPU (embedded model and task, tiny overrides)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

pytest.importorskip("upg_trainer.config")
from upg_trainer.config import build_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))


def _command(path: str) -> str:
    return os.path.basename(path).split("_", 1)[0]


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"hpt_qwen2.5_math_7b.yaml", "hpt_qwen2.5_math_1.5b.yaml", "grpo_qwen2.5_math_7b.yaml",
            "sft_qwen2.5_math_7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds_its_loss(path):
    from upg_trainer.trainer import make_loss_config
    cmd = _command(path)
    assert cmd in ("sft", "grpo", "hpt")
    cfg = build_config(cmd, path)  # unknown keys / wrong types raise here
    make_loss_config(cfg)          # the preset + overrides form a valid LossConfig for this command
    t = cfg.train
    assert (t.lr, t.schedule, t.max_steps, t.batch_size) == (5e-6, "constant", 500, 128)
    assert t.strategy == "fsdp2" and t.mixed_precision == "bf16" and cfg.model.dtype == "float32"
    if cmd in ("grpo", "hpt"):
        r = cfg.rollout
        assert (r.n, r.temperature, r.top_p, r.max_new_tokens, t.mini_batches) == (8, 1.0, 1.0, 8192, 2)
        assert r.engine == "vllm" and r.max_model_len >= cfg.data.max_prompt_tokens + r.max_new_tokens
        assert cfg.reward.funcs == ["math"]
    if cmd == "hpt":
        assert cfg.hpt.gamma == 0.0


def test_hpt_variants():
    c7 = build_config("hpt", os.path.join(ROOT, "examples", "configs", "hpt_qwen2.5_math_7b.yaml"))
    c15 = build_config("hpt", os.path.join(ROOT, "examples", "configs", "hpt_qwen2.5_math_1.5b.yaml"))
    assert c7.loss_preset() == "hpt" and not c7.loss.overrides
    assert c15.loss_preset() == "hpt_release" and c15.loss.overrides == {"demo_coef": 0.3}
    from upg_trainer.trainer import make_loss_config
    lc = make_loss_config(c15)
    assert lc.demo_coef == 0.3 and lc.max_completion_length == 8192


def test_sample_data_has_the_columns():
    from upg_trainer.data import check_columns, load_rows
    rows = load_rows(os.path.join(ROOT, "examples", "data", "sample_math.jsonl"))
    check_columns(rows, ["prompt", "answer", "demonstration"], "sample_math.jsonl", "the examples")


CPU = ["--model.path", "embedded", "--data.path", "embedded", "--data.eval_path", "embedded",
       "--data.num_train", "64", "--data.num_eval", "4", "--model.dtype", "float32",
       "--train.strategy", "none", "--train.mixed_precision", "none", "--train.activation_checkpointing", "false",
       "--rollout.engine", "hf", "--rollout.max_new_tokens", "16", "--data.max_prompt_tokens", "128",
       "--data.max_completion_tokens", "64", "--data.pack_tokens", "256", "--train.max_steps", "2",
       "--train.batch_size", "4", "--train.grad_accum", "1", "--train.lr", "1e-3",
       "--output.progress", "false", "--output.plots", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("script,config", [("hpt.py", "hpt_qwen2.5_math_1.5b.yaml"),
                                           ("sft.py", "sft_qwen2.5_math_7b.yaml")])
def test_example_script_runs_on_cpu(tmp_path, script, config):
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), "--config",
           os.path.join(ROOT, "examples", "configs", config), *CPU, "--output.dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "step 2: loss" in proc.stdout
    assert os.path.isfile(os.path.join(tmp_path, "final", "model.safetensors"))


def test_micro_batches_example_runs():
    """examples/micro_batches.py: accumulated micro-batch gradients with batch_totals equal one call."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "micro_batches.py")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "3 micro-batches x 1 rank(s) vs one call" in proc.stdout


@pytest.mark.slow
def test_trl_grpo_example_global_normalization(tmp_path):
    """examples/trl_grpo.py --tiny (bnpo, one optimizer step of 8 rows): with --normalization global the step's
    loss is the same with 2 accumulation micro-batches as with 1; TRL's own normalisation differs."""
    pytest.importorskip("trl")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import trl_grpo
    finally:
        sys.path.pop(0)

    def step_loss(*extra):
        rows = trl_grpo.main(["--tiny", "--upg-loss", "--max-steps", "1", "--loss-type", "bnpo",
                              "--output-dir", str(tmp_path), *extra])
        return rows[0]["loss"]

    whole = step_loss("--normalization", "global", "--grad-accum", "1")
    assert step_loss("--normalization", "global", "--grad-accum", "2") == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert abs(step_loss("--normalization", "trl", "--grad-accum", "2") - whole) > 1e-3 * abs(whole)
