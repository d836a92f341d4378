"""The paper suite (`upg-train demo --suite paper`): its statistics, LUFFY's in-group demonstrations in
the trainer, and the --quick variant end to end (it runs and writes the table; the ordering is not
asserted)."""
import json

import pytest
import torch

from upg_trainer import demo_paper as dp
from upg_trainer.config import build_config


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_tables(df, expected):
    assert dp.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_mean_ci_and_bad_input():
    m, h = dp.mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert dp.mean_ci([0.4]) == (0.4, None)
    with pytest.raises(ValueError, match="at least one"):
        dp.mean_ci([])
    with pytest.raises(ValueError, match="df >= 1"):
        dp.t_quantile(0.975, 0)


def test_ordering_verdict_counts_pairs_and_intervals():
    # the paper's order with clear, consistent gaps: every pair in order and beyond its paired interval
    base = [0.50, 0.53, 0.47]
    final = {k: [b + 0.1 * (4 - i) for b in base] for i, k in enumerate(dp.PAPER_ORDER)}
    v = dp.ordering_verdict(final)
    assert v["toy_order"] == list(dp.PAPER_ORDER) and v["num_pairs"] == 10
    assert v["pairs_same_order"] == v["pairs_same_order_significant"] == 10
    # reversed HPT vs LUFFY, within noise (a paired difference that changes sign across seeds)
    final["hpt"] = [0.89, 0.92, 0.90]
    final["luffy"] = [0.93, 0.90, 0.92]
    p = next(p for p in dp.ordering_verdict(final)["pairs"] if (p["a"], p["b"]) == ("hpt", "luffy"))
    assert not p["same_order"] and p["significant"] is False and p["intervals_overlap"] and p["adjacent"]
    one = dp.ordering_verdict({k: [v_[0]] for k, v_ in final.items()})   # one seed: no intervals
    assert all(p["significant"] is None for p in one["pairs"])


def _luffy_trainer(tmp_path, **flags):
    from upg_trainer.trainer import Trainer
    f = {"output.dir": str(tmp_path / "luffy"), "output.progress": "false", "output.plots": "false",
         "train.max_steps": "1", "train.batch_size": "3", "rollout.n": "4",
         "rollout.max_new_tokens": "6", "data.num_train": "16", "data.num_eval": "4", "output.save_every": "0"}
    f.update(flags)
    return Trainer(build_config("luffy", None, f))


def test_luffy_demonstration_joins_its_group(tmp_path, monkeypatch):
    import upg_trainer.trainer as T
    seen = []
    real = T.unified_policy_loss

    def spy(*a, **kw):
        seen.append({k: kw[k].detach().clone() for k in ("advantages", "is_demo") if kw.get(k) is not None})
        seen[-1]["mask_tokens"] = kw["loss_mask"].sum(-1)
        return real(*a, **kw)
    monkeypatch.setattr(T, "unified_policy_loss", spy)
    tr = _luffy_trainer(tmp_path)
    m = tr.method.step()
    B, n = 3, 4
    assert m["demo_rows"] == B and m["rollout_rows"] == B * n and m["demos_used"] == B
    assert m["sampled_tokens"] == m["rollout_tokens"] and m["demo_tokens_used"] == m["demo_tokens"] > 0
    adv, demo = seen[0]["advantages"], seen[0]["is_demo"]
    assert demo.tolist() == ([True] + [False] * n) * B          # each group: its demonstration, then n rollouts
    for g in range(B):   # advantages normalised over the n rollouts + the (correct) demonstration
        a = adv[g * (n + 1):(g + 1) * (n + 1)]
        assert abs(float(a.sum())) < 1e-4 and float(a[0]) >= 0
    assert bool((adv[demo] > 0).any())   # a random model fails its rollouts: the demonstration is the signal
    # LUFFY's one token mean over on- and off-policy tokens (not two separately normalised parts)
    joint = (m["loss_main"] * m["rollout_tokens"] + m["loss_demo"] * m["demo_tokens"]) / \
        (m["rollout_tokens"] + m["demo_tokens"])
    assert m["loss"] == pytest.approx(joint, rel=1e-5, abs=1e-7)


def test_demonstration_presets_go_to_their_command(tmp_path):
    from upg_trainer.trainer import make_loss_config
    with pytest.raises(ValueError, match="upg-train hpt"):
        make_loss_config(build_config("grpo", None, {"loss.preset": "hpt"}))
    with pytest.raises(ValueError, match="upg-train luffy"):
        make_loss_config(build_config("grpo", None, {"loss.preset": "luffy"}))
    with pytest.raises(ValueError, match="SFT demonstrations"):
        make_loss_config(build_config("hpt", None, {"loss.preset": "luffy"}))
    with pytest.raises(ValueError, match="shaped demonstrations"):
        make_loss_config(build_config("luffy", None, {"loss.preset": "hpt"}))
    assert make_loss_config(build_config("luffy", None, {})).demo_part == "shaped"


def test_cli_flags_of_the_paper_suite():
    from upg_trainer.cli import parse_config
    c = parse_config(["demo", "--suite", "paper", "--seeds", "5", "--quick"])
    assert (c.demo.suite, c.demo.seeds, c.demo.quick) == ("paper", 5, True)
    with pytest.raises(ValueError, match="demo.seeds"):
        build_config("demo", None, {"demo.seeds": "0"})
    with pytest.raises(ValueError, match="sft_fraction"):
        build_config("demo", None, {"demo.sft_fraction": "1.0"})


def test_quick_paper_suite_writes_the_table(tmp_path):
    from upg_trainer.demo import run_demo
    out = tmp_path / "paper"
    cfg = build_config("demo", None, {"output.dir": str(out), "output.progress": "false", "demo.suite": "paper",
                                      "demo.quick": "true", "demo.jobs": "2"})   # the worker-process path
    res = run_demo(cfg)
    table = (out / "demo.md").read_text()
    for m in dp.METHODS:
        assert f"| {m.label} |" in table
    assert "Paper ordering: HPT (paper) 52.7 > LUFFY 49.8 > SFT->GRPO 46.5 > SFT 44.5 > GRPO 43.1." in table
    assert (out / "demo.png").exists() and not (out / "runs.partial.json").exists()
    data = json.loads((out / "demo.json").read_text())
    steps = dp.QUICK["demo"]["steps"]
    assert data["seeds"] == [0] and len(data["runs"]) == len(dp.METHODS)
    assert data["environment"]["torch"] == torch.__version__ and data["timing"]["cpu_s"] > 0
    runs = {r["method"]: r for r in data["runs"]}
    assert all(r["gradient_steps"] == steps and r["curve"][-1]["step"] == steps for r in runs.values())
    assert [p["steps"] for p in runs["sft_grpo"]["phases"]] == [steps // 2, steps // 2]
    bs = dp.QUICK["train"]["batch_size"]
    assert runs["sft"]["sampled_tokens"] == 0 and runs["sft"]["demos_used"] == steps * bs
    assert runs["grpo"]["demos_used"] == 0 and runs["grpo"]["sampled_tokens"] > 0
    assert runs["luffy"]["demos_used"] == steps * bs
    assert runs["sft_grpo"]["demos_used"] == steps // 2 * bs
    assert 0 <= runs["hpt"]["demos_used"] <= steps * bs
    assert len(data["verdict"]["pairs"]) == 10 and res["verdict"]["num_pairs"] == 10
    assert set(data["summary"]["hpt"]["levels"]) == {str(lv) for lv in cfg.demo.levels}


def test_missing_matplotlib_is_said(monkeypatch, capsys, tmp_path):
    from upg_trainer import plots

    def no_mpl():
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(plots, "_pyplot", no_mpl)
    assert dp.plot_bands([], str(tmp_path / "x.png"), [0], build_config("demo", None, {})) is None
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_resume_runs_only_the_missing_runs(tmp_path, monkeypatch):
    """--resume: the finished runs of runs.partial.json are kept, only the missing ones run; a partial
    file of other settings is refused."""
    from upg_trainer.demo import run_demo
    out = tmp_path / "paper"
    (out / "warmup" / "final").mkdir(parents=True)
    cfg = build_config("demo", None, {"output.dir": str(out), "output.progress": "false", "demo.suite": "paper",
                                      "demo.quick": "true", "output.resume": "true"})

    def record(m, seed):
        return {"method": m.key, "label": m.label, "seed": seed, "steps": 4, "gradient_steps": 4, "phases": [],
                "acc": 0.5, "acc_levels": {"1": 0.5, "5": 0.5}, "curve": [{"step": 4, "acc": 0.5}],
                "sampled_tokens": 0, "demos_used": 0, "demo_tokens_used": 0, "train_reward_last10": None,
                "sft_share_mean": None, "wall_s": 1.0, "cpu_s": 1.0}
    warm = {"steps": 4, "acc": 0.1, "acc_levels": {"1": 0.1, "5": 0.1}, "wall_s": 1.0, "cpu_s": 1.0}
    done = [record(m, 0) for m in dp.METHODS[:-1]]
    (out / "runs.partial.json").write_text(json.dumps({"settings": dp._settings(dp.quick_config(cfg)),
                                                       "warmup": warm, "runs": done}))
    calls = []

    def fake_run(cfg_, m, seed, *a):
        calls.append((m.key, seed))
        return record(m, seed)
    monkeypatch.setattr(dp, "_run_method", fake_run)
    res = run_demo(cfg)
    assert calls == [(dp.METHODS[-1].key, 0)] and len(res["runs"]) == len(dp.METHODS)
    assert res["timing"]["cpu_s"] == pytest.approx(1.0 + len(dp.METHODS))
    assert not (out / "runs.partial.json").exists()
    (out / "runs.partial.json").write_text(json.dumps({"settings": {"other": 1}, "warmup": warm, "runs": done}))
    with pytest.raises(ValueError, match="other settings"):
        run_demo(cfg)
