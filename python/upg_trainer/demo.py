"""``upg-train demo``: the embedded task end to end on a CPU.

1. Warm-up: a brief SFT run from a random init on the easy levels (``demo.warmup_levels``), so
   that rollouts get non-zero reward there, while the harder level(s) still score ~0.
2. From the warm-up model, with the same prompts in the same order: SFT, GRPO and HPT for
   ``demo.steps`` steps each on all levels.
3. A comparison table (held-out greedy accuracy before/after, per level, train reward, SFT share,
   time), ``demo.md`` / ``demo.json``, and the curves in ``demo.png``.

GRPO cannot learn a level whose every rollout fails (all advantages 0); HPT switches exactly those
prompts to SFT on their demonstrations and keeps RL where the model already succeeds.
"""
from __future__ import annotations

import os
import time

from .checkpoint import read_metrics
from .config import Config
from .demo_common import _derive, run_environment, save_report  # noqa: F401  (their home before)


def _summary(name: str, out: str, seconds: float) -> dict:
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    ev = [r for r in rows if r.get("kind") == "eval"]
    tr = [r for r in rows if r.get("kind") == "train"]
    last = tr[-10:]

    def mean(key):
        v = [r[key] for r in last if key in r]
        return sum(v) / len(v) if v else None

    s = {"method": name, "steps": len(tr), "acc_before": ev[0]["eval/accuracy"] if ev else None,
         "acc_after": ev[-1]["eval/accuracy"] if ev else None, "train_reward_last10": mean("reward"),
         "sft_share_mean": (sum(r.get("sft_share", 0) for r in tr) / len(tr)) if tr else None,
         "seconds": seconds}
    if ev:
        for k, v in ev[-1].items():
            if k.startswith("eval/acc_level"):
                s["after_" + k.split("/")[1]] = v
    return s


def _fmt(v, pct=True):
    if v is None:
        return "-"
    return f"{100 * v:5.1f}%" if pct else f"{v:.2f}"


def format_table(rows: list[dict]) -> str:
    levels = sorted({k for r in rows for k in r if k.startswith("after_acc_level")})
    head = ["method", "steps", "acc before", "acc after"] + [f"L{k[-1]} after" for k in levels] + \
        ["train reward", "SFT share", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["steps"]), _fmt(r["acc_before"]), _fmt(r["acc_after"])] + \
            [_fmt(r.get(k)) for k in levels] + \
            [_fmt(r["train_reward_last10"], pct=False), _fmt(r["sft_share_mean"], pct=False),
             f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(cfg: Config) -> list[dict]:
    if cfg.demo.suite == "preference":
        from .demo_preference import run_preference_demo
        return run_preference_demo(cfg)
    from .plots import plot_comparison
    from .trainer import Trainer

    root = cfg.output.dir
    os.makedirs(root, exist_ok=True)
    d = cfg.demo
    t_all = time.time()
    summaries = []

    print(f"[demo] 1/{1 + len(d.methods)} warm-up: SFT on levels {d.warmup_levels} for {d.warmup_steps} steps")
    wdir = os.path.join(root, "warmup")
    common_data = {"eval_levels": list(d.levels)}
    wcfg = _derive(cfg, "sft", wdir, data=dict(common_data, levels=list(d.warmup_levels)),
                   rollout={"max_new_tokens": d.max_new_tokens},
                   train={"max_steps": d.warmup_steps, "lr": d.warmup_lr, "batch_size": 32,
                          "warmup_steps": min(10, d.warmup_steps), "schedule": "cosine", "min_lr_ratio": 0.1},
                   output={"eval_every": max(1, d.warmup_steps // 4), "save_every": 0})
    t0 = time.time()
    Trainer(wcfg).train()
    summaries.append(_summary(f"warm-up (SFT, levels {','.join(map(str, d.warmup_levels))})", wdir,
                              time.time() - t0))

    runs = {}
    for i, m in enumerate(d.methods, 2):
        print(f"[demo] {i}/{1 + len(d.methods)} {m} from the warm-up model for {d.steps} steps")
        out = os.path.join(root, m)
        mcfg = _derive(cfg, m, out, model={"path": os.path.join(wdir, "final")},
                       data=dict(common_data, levels=list(d.levels)),
                       rollout={"max_new_tokens": d.max_new_tokens},
                       train={"max_steps": d.steps, "lr": d.lr, "schedule": "cosine", "min_lr_ratio": 0.1,
                              "warmup_steps": 0},
                       output={"save_every": 0, "eval_every": max(1, d.steps // 5)})
        t0 = time.time()
        Trainer(mcfg).train()
        summaries.append(_summary(m, out, time.time() - t0))
        runs[m] = os.path.join(out, "metrics.jsonl")

    total = time.time() - t_all
    table = format_table(summaries)
    png = plot_comparison(runs, os.path.join(root, "demo.png"),
                          title=f"embedded task: SFT vs GRPO vs HPT after an SFT warm-up ({total:.0f} s in all)")
    save_report(root, summaries, table, total)
    print(f"\nheld-out: {cfg.data.num_eval} problems, greedy decoding; train reward = mean of the last 10 steps; "
          f"total {total:.0f} s\ncurves: {png}\nruns: {root}/<method>/metrics.jsonl, plots.png, final/")
    return summaries
