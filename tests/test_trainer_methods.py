"""The method registry (methods/): every command is one Method class that the CLI, the config and the
Trainer read; a new method is one class. Also the command line's launch errors (the [trainer] extra,
model.device, train.strategy without torchrun), the ppo.kl_type list's one owner and the warning of an
RL run whose rewards carry no signal."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer_fakes import ScriptedEngine
from upg_trainer import methods
from upg_trainer.checkpoint import list_checkpoints, load_checkpoint, read_metrics
from upg_trainer.cli import commands, main, make_parser
from upg_trainer.config import SECTIONS, build_config
from upg_trainer.methods import METHODS, Method, get_method
from upg_trainer.methods.rl import NO_SIGNAL_STEPS
from upg_trainer.task import LEVELS
from upg_trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = {"output.progress": "false", "output.plots": "false", "data.eval_path": "", "train.batch_size": "2",
        "rollout.n": "2", "rollout.max_new_tokens": "4", "data.num_train": "4", "output.save_every": "0"}


def cfg(tmp_path, command, **kw):
    d = dict(FAST, **{"output.dir": str(tmp_path / "out")})
    d.update({k: str(v) for k, v in kw.items()})
    return build_config(command, None, d)


def test_registry_is_the_one_list_of_commands():
    assert list(METHODS) == ["sft", "grpo", "hpt", "rm", "dpo", "ppo", "eval"]
    assert list(commands()) == [*METHODS, "demo"]
    sub = next(a for a in make_parser()._actions if a.dest == "command")
    assert list(sub.choices) == [*METHODS, "demo"]
    for name, m in METHODS.items():
        assert m.name == name and m.help and issubclass(m, Method)
        c = build_config(name)
        assert c.loss_preset() == (m.loss_preset or "grpo")
        for sec in m.sections:
            assert sec in SECTIONS
    with pytest.raises(ValueError, match="unknown upg-train method 'nope'; methods are"):
        get_method("nope")


def test_method_sections_in_help():
    def groups(cmd):
        p = next(a for a in make_parser()._actions if a.dest == "command").choices[cmd]
        return {g.title.split()[0] for g in p._action_groups if g.title.endswith(" options")}
    assert "hpt" in groups("hpt") and "hpt" not in groups("grpo") and "ppo" not in groups("hpt")
    assert {"pref"} <= groups("dpo") and "rm" not in groups("dpo") and "demo" not in groups("sft")
    assert set(SECTIONS) <= groups("demo")


class Echo(Method):
    """A toy method: SFT's data, one update a step on a plain NLL of the demonstration (no unified loss)."""
    name = "echo"
    help = "toy method of the registry test"
    defaults = {"train": {"lr": 1e-2}, "output": {"dir": "runs/echo"}}
    columns = ("prompt_column", "demo_column")

    def setup(self):
        self.steps_taken = 0

    def step(self):
        from upg_trainer.data import build_rows, encode_completion
        tr = self.tr
        rows = [tr.train_rows[i] for i in tr.sampler.take(self.cfg.train.batch_size)]
        mb = build_rows([tr.prompt_ids(r) for r in rows], [encode_completion(tr.tok, r["demonstration"])
                                                            for r in rows], tr.tok.pad_token_id)

        def loss_of(k, mb, extra):
            logits = tr.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, mb.start:]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mb.targets.flatten(),
                                                    ignore_index=-100, reduction="none")
            m = mb.loss_mask.flatten()
            return (nll * m).sum() / m.sum(), {}, 1.0
        self.steps_taken += 1
        return tr.update([(mb, {})], loss_of)

    def state_dict(self):
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, st):
        self.steps_taken = st["steps_taken"]


def test_a_new_method_is_one_class(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(methods.METHODS, "echo", Echo)
    assert "echo" in commands()
    out = tmp_path / "echo"
    args = ["echo", "--output.dir", str(out), "--train.max_steps", "3", "--data.num_train", "8",
            "--train.batch_size", "2", "--data.eval_path", "", "--output.progress", "false",
            "--output.plots", "false"]
    assert main(args) == 0
    c = build_config("echo", None, {"output.dir": str(out)})
    assert c.train.lr == 1e-2 and c.loss_preset() == "grpo"  # its defaults; no preset of its own
    rows = read_metrics(str(out / "metrics.jsonl"))
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # its state is in the checkpoints and comes back on --resume (2 more steps: 5 in all)
    assert main([*args[:4], "5", *args[5:], "--resume"]) == 0
    st = load_checkpoint(list_checkpoints(str(out))[-1][1])[2]
    assert st["step"] == 5 and st["method"] == {"steps_taken": 5} and st["command"] == "echo"


def test_kl_type_list_has_one_owner(tmp_path):
    from upg_kernels.losses.config import KL_TYPES
    for k in KL_TYPES:
        assert build_config("ppo", None, {"ppo.kl_type": k}).ppo.kl_type == k
    with pytest.raises(ValueError, match="ppo.kl_type must be one of k1, k2, k3 .*got 'abs'"):
        build_config("ppo", None, {"ppo.kl_type": "abs"})
    help_text = subprocess.run([sys.executable, "-m", "upg_trainer.cli", "ppo", "--help"], capture_output=True,
                               text=True, env=dict(os.environ, COLUMNS="200")).stdout
    assert "in the reward: " + " | ".join(KL_TYPES) + " (default: k1)" in help_text


def test_levels_help_names_every_level():
    p = next(a for a in make_parser()._actions if a.dest == "command").choices["grpo"]
    h = next(a.help for a in p._actions if a.dest == "data.levels")
    assert f"({min(LEVELS)}-{max(LEVELS)})" in h and len(LEVELS) == 5


def test_device_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["sft", "--model.device", "cuda", "--output.dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "model.device 'cuda'" in err[0] and "--model.device cpu" in err[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="not a device name"):
        Trainer(cfg(tmp_path, "sft", **{"model.device": "gpu0"}))


def test_strategy_without_torchrun(tmp_path, capsys):
    rc = main(["grpo", "--train.strategy", "ddp", "--output.dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "torchrun --nproc-per-node N -m upg_trainer.cli grpo" in err[0] and "--train.strategy none" in err[0]


def test_missing_trainer_extra_names_it():
    script = textwrap.dedent("""
        import sys

        class NoYaml:
            def find_spec(self, name, path=None, target=None):
                if name == "yaml" or name.startswith("yaml."):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, NoYaml())
        from upg_trainer.cli import main
        sys.exit(main(["grpo", "--help"]))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "pip install 'upg-kernels[trainer]'" in r.stderr and "pyyaml" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_signal_warning(tmp_path, capsys):
    rw = tmp_path / "has1.py"
    rw.write_text("def has1(prompts, completions, **kw):\n    return [float('1' in c) for c in completions]\n")
    tr = Trainer(cfg(tmp_path, "grpo", **{"reward.funcs": f"[{rw}:has1]"}))
    tr.engine = ScriptedEngine(tr, lambda k, j: ("\\boxed{x}", "stop"))   # reward 0 everywhere
    for i in range(NO_SIGNAL_STEPS):
        m = tr.train_step()
        assert m["reward"] == 0.0 and m["grad_norm"] == 0.0
        out = capsys.readouterr().out
        assert ("no learning signal" in out) == (i == NO_SIGNAL_STEPS - 1)
    assert "model.path='embedded' is a randomly initialised model" in out and "--model.path runs/sft/final" in out
    tr.train_step()
    assert "no learning signal" not in capsys.readouterr().out   # once
    # hpt says what it trains on meanwhile; a run whose first step has a signal is never warned
    tr2 = Trainer(cfg(tmp_path / "b", "hpt", **{"reward.funcs": f"[{rw}:has1]"}))
    tr2.engine = ScriptedEngine(tr2, lambda k, j: ("\\boxed{x}", "stop"))
    for _ in range(NO_SIGNAL_STEPS):
        assert tr2.train_step()["sft_share"] == 1.0
    assert "hpt trains every prompt on its demonstration (SFT) meanwhile" in capsys.readouterr().out
    tr3 = Trainer(cfg(tmp_path / "c", "grpo", **{"reward.funcs": f"[{rw}:has1]"}))
    tr3.engine = ScriptedEngine(tr3, lambda k, j: ("\\boxed{1}" if k == j == 0 else "\\boxed{x}", "stop"))
    for _ in range(NO_SIGNAL_STEPS + 1):
        tr3.train_step()
    assert "no learning signal" not in capsys.readouterr().out
