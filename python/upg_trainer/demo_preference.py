"""``upg-train demo --demo.suite preference``: the embedded task with preference pairs.

1. SFT warm-up from a random init (the main demo's warm-up recipe, ``demo.warmup_*``).
2. From the warm-up model: ``dpo``, and ``dpo`` + NLL on the chosen answer (``demo.dpo_nll_coef``),
   on pairs chosen = the worked solution, rejected = the same with a wrong result
   (``task.add_preference_pairs``); reference = the warm-up checkpoint.
3. From the warm-up model: ``rm`` (Bradley-Terry on the same pairs), then ``ppo`` with the reward
   model as its only reward (``rm:<rm>/final``), its critic initialised from the reward model; the
   held-out accuracy is graded by the task's verifier (``reward.eval_funcs = [task]``); a control
   ``ppo`` run with the verifier itself as the reward (critic from the SFT weights) separates what
   PPO does from what the reward model gives it.
4. A table (held-out greedy accuracy, held-out pair accuracy, train reward, time), ``demo.md`` /
   ``demo.json`` and ``demo.png`` under ``output.dir``.
"""
from __future__ import annotations

import os
import time

from .checkpoint import read_metrics
from .config import Config
from .demo_common import _derive, save_report

PANELS = [("eval", "eval/accuracy", "held-out accuracy (greedy, verifier)"),
          ("eval", "eval/pair_accuracy", "held-out pair accuracy"),
          ("train", "reward_margin", "train reward margin (DPO implicit / RM)"),
          ("train", "reward", "PPO train reward (RM score)"),
          ("train", "loss", "loss"),
          ("train", "kl_seq", "PPO KL to the reference (per sequence)")]


def _row(name: str, out: str, seconds: float) -> dict:
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    ev = [r for r in rows if r.get("kind") == "eval"]
    tr = [r for r in rows if r.get("kind") == "train"]

    def first_last(key):
        v = [r[key] for r in ev if key in r]
        return (v[0], v[-1]) if v else (None, None)

    def mean_last(key):
        v = [r[key] for r in tr[-10:] if key in r]
        return sum(v) / len(v) if v else None
    a0, a1 = first_last("eval/accuracy")
    p0, p1 = first_last("eval/pair_accuracy")
    return {"method": name, "steps": len(tr), "acc_before": a0, "acc_after": a1, "pair_acc_before": p0,
            "pair_acc_after": p1, "train_reward_last10": mean_last("reward"),
            "reward_margin_last10": mean_last("reward_margin"), "seconds": seconds}


def _fmt(v, pct=True):
    if v is None:
        return "-"
    return f"{100 * v:5.1f}%" if pct else f"{v:.2f}"


def format_table(rows: list[dict]) -> str:
    head = ["method", "steps", "acc before", "acc after", "pair acc before", "pair acc after",
            "train reward", "reward margin", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["steps"]), _fmt(r["acc_before"]), _fmt(r["acc_after"]),
                 _fmt(r["pair_acc_before"]), _fmt(r["pair_acc_after"]), _fmt(r["train_reward_last10"], False),
                 _fmt(r["reward_margin_last10"], False), f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_preference_demo(cfg: Config) -> list[dict]:
    from .plots import plot_comparison
    from .trainer import Trainer

    root = cfg.output.dir
    if root == "runs/demo":  # the default: keep the main demo's directory for the main demo
        root = "runs/demo-preference"
    os.makedirs(root, exist_ok=True)
    d = cfg.demo
    t_all = time.time()
    rows, runs = [], {}
    data = {"levels": list(d.levels), "eval_levels": list(d.levels)}
    fast = {"save_every": 0, "eval_every": max(1, d.pref_steps // 4)}

    def run(i, name, command, out, **sections):
        print(f"[demo:preference] {i}/6 {name}")
        c = _derive(cfg, command, out, **sections)
        t0 = time.time()
        Trainer(c).train()
        rows.append(_row(name, out, time.time() - t0))
        if command != "sft":
            runs[name] = os.path.join(out, "metrics.jsonl")

    wdir = os.path.join(root, "sft")
    run(1, f"SFT warm-up ({d.warmup_steps} steps, levels {','.join(map(str, d.warmup_levels))})", "sft", wdir,
        data={"eval_levels": list(d.levels), "levels": list(d.warmup_levels)},
        rollout={"max_new_tokens": d.max_new_tokens},
        train={"max_steps": d.warmup_steps, "lr": d.warmup_lr, "batch_size": 32, "schedule": "cosine",
               "warmup_steps": min(10, d.warmup_steps), "min_lr_ratio": 0.1},
        output={"eval_every": max(1, d.warmup_steps // 4), "save_every": 0})
    sft = os.path.join(wdir, "final")
    common = {"rollout": {"max_new_tokens": d.max_new_tokens}, "output": fast}
    run(2, "dpo (from SFT)", "dpo", os.path.join(root, "dpo"), model={"path": sft}, data=data,
        train={"max_steps": d.pref_steps, "lr": d.pref_lr, "batch_size": 16}, **common)
    run(3, f"dpo + NLL (nll_coef {d.dpo_nll_coef:g}, from SFT)", "dpo", os.path.join(root, "dpo_nll"),
        model={"path": sft}, data=data, pref={"overrides": {"nll_coef": d.dpo_nll_coef}},
        train={"max_steps": d.pref_steps, "lr": d.pref_lr, "batch_size": 16}, **common)
    rm_dir = os.path.join(root, "rm")
    run(4, "rm (from SFT)", "rm", rm_dir, model={"path": sft}, data=data,
        train={"max_steps": d.rm_steps, "lr": d.rm_lr, "batch_size": 16},
        rollout={"max_new_tokens": d.max_new_tokens}, output={"save_every": 0, "eval_every": max(1, d.rm_steps // 4)})
    run(5, "ppo (SFT policy, RM reward, critic from RM)", "ppo", os.path.join(root, "ppo"), model={"path": sft},
        data=data, reward={"funcs": [f"rm:{os.path.join(rm_dir, 'final')}"], "eval_funcs": ["task"]},
        train={"max_steps": d.pref_steps, "lr": d.pref_lr, "batch_size": 8},
        rollout={"max_new_tokens": d.max_new_tokens, "n": 4}, output=fast)
    run(6, "ppo control (verifier reward, critic from SFT)", "ppo", os.path.join(root, "ppo_verifier"),
        model={"path": sft}, data=data, reward={"funcs": ["task"], "eval_funcs": []},
        train={"max_steps": d.pref_steps, "lr": d.pref_lr, "batch_size": 8},
        rollout={"max_new_tokens": d.max_new_tokens, "n": 4}, output=fast)
    total = time.time() - t_all
    table = format_table(rows)
    png = plot_comparison(runs, os.path.join(root, "demo.png"), panels=PANELS,
                          title=f"embedded task: SFT -> DPO and SFT -> RM -> PPO ({total:.0f} s in all)")
    save_report(root, rows, table, total)
    print(f"\nheld-out: {cfg.data.num_eval} problems (greedy, graded by the verifier) and their pairs; train "
          f"reward = mean RM score of the last 10 PPO steps; total {total:.0f} s\ncurves: {png}")
    return rows
