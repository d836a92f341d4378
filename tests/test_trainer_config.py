"""upg-train CLI parsing and config precedence (defaults < command < YAML < flags)."""
import subprocess
import sys

import pytest

from upg_trainer.cli import make_parser, parse_config
from upg_trainer.config import build_config


def test_defaults_per_command():
    assert build_config("sft").loss_preset() == "sft"
    assert build_config("grpo").loss_preset() == "grpo"
    assert build_config("hpt").loss_preset() == "hpt"
    assert build_config("sft").output.dir == "runs/sft"


def test_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-5\n  max_steps: 7\nrollout: {n: 4}\nloss:\n  preset: hpt_release\n"
                 "  overrides: {entropy_coef: 0.0}\ndata: {levels: [3]}\n")
    cfg = parse_config(["hpt", "--config", str(y), "--train.max_steps", "9", "--hpt.gamma", "0.25",
                        "--resume"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 9          # flag beats YAML
    assert cfg.rollout.n == 4                # YAML beats default
    assert cfg.loss_preset() == "hpt_release" and cfg.loss.overrides == {"entropy_coef": 0.0}
    assert cfg.data.levels == [3] and cfg.hpt.gamma == 0.25 and cfg.output.resume is True


def test_flag_types():
    cfg = parse_config(["grpo", "--train.betas", "[0.9, 0.95]", "--data.packing", "false",
                        "--loss.overrides", "{eps_high: 0.28}", "--reward.funcs", "math"])
    assert cfg.train.betas == [0.9, 0.95] and cfg.data.packing is False
    assert cfg.loss.overrides == {"eps_high": 0.28} and cfg.reward.funcs == ["math"]


@pytest.mark.parametrize("argv,msg", [
    (["grpo", "--train.max_steps", "abc"], "train.max_steps"),
    (["grpo", "--train.schedule", "weird"], "train.schedule"),
    (["grpo", "--rollout.n", "0"], "rollout.n"),
])
def test_bad_flags_are_named(argv, msg, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert msg in capsys.readouterr().err


def test_bad_yaml_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train: {learning_rate: 1}\n")
    with pytest.raises(ValueError, match="train.learning_rate"):
        build_config("sft", str(y))
    y.write_text("trainer: {lr: 1}\n")
    with pytest.raises(ValueError, match="unknown section 'trainer'"):
        build_config("sft", str(y))
    with pytest.raises(ValueError, match="cannot read config file"):
        build_config("sft", str(tmp_path / "missing.yaml"))


def test_help_lists_commands_and_options():
    text = make_parser().format_help()
    for c in ("sft", "grpo", "hpt", "eval", "demo"):
        assert c in text
    out = subprocess.run([sys.executable, "-m", "upg_trainer.cli", "hpt", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--hpt.gamma" in out and "--loss.preset" in out and "--train.grad_accum" in out
