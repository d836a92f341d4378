"""``upg-train demo --suite paper``: the HPT paper's comparison on the embedded task, over several seeds.

Lv et al., "Towards a Unified View of Large Language Model Post-Training" (arXiv:2509.04419) compare, on
Qwen2.5-Math-7B (average over six math benchmarks): HPT 52.7 > LUFFY 49.8 > SFT->GRPO 46.5 > SFT 44.5 >
GRPO 43.1. This suite runs those methods (and HPT as released) on the embedded task:

1. One SFT warm-up from the random init (the main demo's recipe, ``demo.warmup_*``), shared by every
   method and every seed: the "base model" of the comparison.
2. For each seed ``train.seed + i`` (i < ``demo.seeds``) and each method of :data:`METHODS`, from the
   warm-up checkpoint: ``demo.steps`` optimizer updates of ``train.batch_size`` prompts (the same prompts
   in the same order for every method of a seed), lr ``demo.lr`` (cosine to 10%), the same fixed held-out
   set (``heldout.jsonl``, ``data.num_eval`` problems of ``demo.levels``), greedy accuracy at 7 points.
3. A table of mean +- 95% t-interval over seeds of the final held-out accuracy (overall and per level),
   with the budget each method used (gradient steps, sampled tokens, demonstrations and their tokens,
   wall and CPU time), the paper's ordering checked pair by pair (paired differences over seeds with
   their 95% intervals), ``demo.md`` / ``demo.json`` / ``demo.png`` (curves with bands).

SRFT is not run: see docs/trainer.md ("The paper suite") for why it does not fit the loss's parts.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass

from .checkpoint import read_metrics
from .config import Config
from .demo import warmup_config
from .demo_common import _derive, run_environment


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    phases: tuple   # ((command, loss preset), ...): one phase, or SFT then GRPO (split by demo.sft_fraction)
    note: str


METHODS = (
    Method("sft", "SFT", (("sft", "sft"),), "NLL on the demonstrations"),
    Method("grpo", "GRPO", (("grpo", "grpo"),), "n rollouts a prompt, clipped, A = (R - mean)/std"),
    Method("sft_grpo", "SFT->GRPO", (("sft", "sft"), ("grpo", "grpo")),
           "SFT for demo.sft_fraction of the steps, then GRPO on the next prompts"),
    Method("luffy", "LUFFY", (("luffy", "luffy"),),
           "n rollouts + the demonstration in each group; demonstration -A p/(p+0.1); one token mean"),
    Method("hpt", "HPT (paper)", (("hpt", "hpt"),), "P > 0: clipped GRPO on the rollouts, else NLL on the demonstration"),
    Method("hpt_release", "HPT (release)", (("hpt", "hpt_release"),),
           "the released code: no std, no clip, Dr.GRPO norm, entropy 0.001"),
)
# the paper's Table (Qwen2.5-Math-7B, average over six math benchmarks); HPT = the paper's formulas
PAPER = {"hpt": 52.7, "luffy": 49.8, "sft_grpo": 46.5, "sft": 44.5, "grpo": 43.1}
PAPER_ORDER = tuple(sorted(PAPER, key=PAPER.get, reverse=True))
EVAL_POINTS = 6     # evaluations after step 0 (the SFT->GRPO switch lies on this grid)
# --quick (CI): one seed, a few steps, a small held-out set; asserts that it runs, not the ordering
QUICK = {"demo": {"seeds": 1, "warmup_steps": 4, "steps": 4, "max_new_tokens": 8},
         "data": {"num_eval": 8, "num_train": 64}, "train": {"batch_size": 4}, "rollout": {"n": 4}}


# ------------------------------------------------------------------------------------------ statistics
@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: bisection on the CDF,
    whose density is integrated by Simpson's rule (exact to ~1e-6; no scipy needed)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t):
        return math.exp(c - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(x, n=2000):
        h = x / n
        s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(xs: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its two-sided t-interval (None for one value)."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = sum(xs) / n
    if n < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


def compare_pair(a: list[float], b: list[float]) -> dict:
    """``a`` vs ``b`` (same seeds, same order): the paired difference a - b, its 95% t-interval, and
    whether the two methods' own intervals overlap."""
    d_mean, d_h = mean_ci([x - y for x, y in zip(a, b)])
    (ma, ha), (mb, hb) = mean_ci(a), mean_ci(b)
    out = {"diff": d_mean, "diff_ci": d_h}
    if d_h is None:
        out.update(significant=None, intervals_overlap=None)
    else:
        out.update(significant=abs(d_mean) > d_h, intervals_overlap=abs(ma - mb) <= ha + hb)
    return out


def ordering_verdict(final: dict) -> dict:
    """The paper's ordering checked on ``final`` ({method key: [accuracy per seed]}): every adjacent pair
    of :data:`PAPER_ORDER` and the count over all pairs."""
    pairs = []
    for i, a in enumerate(PAPER_ORDER):
        for b in PAPER_ORDER[i + 1:]:
            c = compare_pair(final[a], final[b])
            c.update(a=a, b=b, paper_diff=round(PAPER[a] - PAPER[b], 1), same_order=c["diff"] > 0, tie=c["diff"] == 0,
                     adjacent=PAPER_ORDER.index(b) == i + 1)
            pairs.append(c)
    toy = sorted(PAPER_ORDER, key=lambda k: -sum(final[k]) / len(final[k]))
    return {"paper_order": list(PAPER_ORDER), "toy_order": toy, "pairs": pairs,
            "pairs_same_order": sum(p["same_order"] for p in pairs),
            "pairs_same_order_significant": sum(bool(p["same_order"] and p["significant"]) for p in pairs),
            "pairs_reversed_significant": sum(bool(p["diff"] < 0 and p["significant"]) for p in pairs),
            "pairs_tied": sum(p["tie"] for p in pairs),
            "num_pairs": len(pairs)}


# ------------------------------------------------------------------------------------------ runs
def _label(key: str) -> str:
    return next(m.label for m in METHODS if m.key == key)


def _cpu() -> float:
    return time.process_time()


def _phase_steps(cfg: Config, m: Method) -> list[int]:
    d = cfg.demo
    if len(m.phases) == 1:
        return [d.steps]
    e = _eval_every(cfg)
    k = min(max(e, e * round(d.sft_fraction * d.steps / e)), d.steps - e)   # on the evaluation grid
    return [k, d.steps - k]


def _eval_every(cfg: Config) -> int:
    return max(1, cfg.demo.steps // EVAL_POINTS)


def _run_method(cfg: Config, m: Method, seed: int, out: str, warm: str, heldout: str) -> dict:
    """One method, one seed: its phases from the warm-up checkpoint; the record of demo.json."""
    from .cli import _quiet_transformers
    from .trainer import Trainer
    _quiet_transformers()   # also in a worker process (demo.jobs > 1), which does not run cli.main
    d = cfg.demo
    model, pos, offset = warm, 0, 0
    evals, train_rows, updates = [], [], 0
    t0, c0 = time.time(), _cpu()
    for (command, preset), steps in zip(m.phases, _phase_steps(cfg, m)):
        pdir = os.path.join(out, command) if len(m.phases) > 1 else out
        c = _derive(cfg, command, pdir, model={"path": model},
                    data={"levels": list(d.levels), "eval_levels": list(d.levels), "eval_path": heldout},
                    rollout={"max_new_tokens": d.max_new_tokens}, loss={"preset": preset},
                    train={"max_steps": steps, "lr": d.lr, "schedule": "cosine", "min_lr_ratio": 0.1,
                           "warmup_steps": 0, "seed": seed},
                    output={"save_every": 0, "eval_every": _eval_every(cfg), "plots": False})
        tr = Trainer(c)
        tr.sampler.pos = pos            # SFT->GRPO: GRPO continues with the prompts after SFT's
        tr.train()
        pos = tr.sampler.pos
        updates += steps * (c.train.mini_batches if command != "sft" else 1)
        rows = read_metrics(os.path.join(pdir, "metrics.jsonl"))
        evals += [dict(r, step=r["step"] + offset) for r in rows
                  if r.get("kind") == "eval" and not (offset and r["step"] == 0)]
        train_rows += [r for r in rows if r.get("kind") == "train"]
        model, offset = os.path.join(pdir, "final"), offset + steps
    last = evals[-1]

    def total(key):
        return int(sum(r.get(key, 0) for r in train_rows))
    return {"method": m.key, "label": m.label, "seed": seed, "steps": offset, "gradient_steps": updates,
            "phases": [{"command": c_, "preset": p_, "steps": s_}
                       for (c_, p_), s_ in zip(m.phases, _phase_steps(cfg, m))],
            "acc": last["eval/accuracy"],
            "acc_levels": {k.split("acc_level")[1]: v for k, v in last.items() if k.startswith("eval/acc_level")},
            "curve": [{"step": r["step"], "acc": r["eval/accuracy"],
                       **{k.split("/")[1]: v for k, v in r.items() if k.startswith("eval/acc_level")}}
                      for r in evals],
            "sampled_tokens": total("sampled_tokens"), "demos_used": total("demos_used"),
            "demo_tokens_used": total("demo_tokens_used"),
            "train_reward_last10": _mean([r["reward"] for r in train_rows[-10:] if "reward" in r]),
            "sft_share_mean": _mean([r.get("sft_share", 0.0) for r in train_rows]),
            "wall_s": time.time() - t0, "cpu_s": _cpu() - c0}


def _settings(cfg: Config) -> dict:
    """What the suite's numbers depend on (all but the output options, the number of seeds and of jobs)."""
    s = cfg.to_dict()
    s.pop("output")
    s["demo"] = {k: v for k, v in s["demo"].items() if k not in ("seeds", "jobs")}
    return s


def _resumed(cfg: Config, partial: str, wdir: str):
    """``--resume``: the warm-up and the finished runs of an interrupted suite (``runs.partial.json``),
    when its settings equal this one's; else a fresh start (None, [])."""
    if not (cfg.output.resume and os.path.exists(partial)):
        return None, []
    with open(partial) as f:
        saved = json.load(f)
    if saved.get("settings") != _settings(cfg):
        raise ValueError(f"--resume: {partial} was written with other settings; start over without --resume "
                         "(or in another output.dir)")
    if not os.path.isdir(os.path.join(wdir, "final")):
        raise ValueError(f"--resume: the warm-up checkpoint {wdir}/final is missing; start over")
    print(f"[demo:paper] resuming: the warm-up and {len(saved['runs'])} finished run(s) from {partial}")
    return saved["warmup"], saved["runs"]


def _git_commit():
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _mean(v):
    return sum(v) / len(v) if v else None


def _heldout(cfg: Config, root: str) -> str:
    """The held-out problems as a file: the same set for every method and every seed (the intervals
    measure training noise, not a different test sample per seed)."""
    from .data import load_rows
    d = cfg.data
    rows = load_rows("embedded", num=d.num_eval, seed=cfg.train.seed, levels=list(cfg.demo.levels), eval_set=True)
    path = os.path.join(root, "heldout.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def quick_config(cfg: Config) -> Config:
    import copy
    c = copy.deepcopy(cfg)
    for sec, vals in QUICK.items():
        for k, v in vals.items():
            setattr(getattr(c, sec), k, v)
    return c


def run_paper_demo(cfg: Config) -> dict:
    from .trainer import Trainer
    if cfg.demo.quick:
        cfg = quick_config(cfg)
    d = cfg.demo
    root = cfg.output.dir
    if root == "runs/demo":  # the default: keep the main demo's directory for the main demo
        root = "runs/demo-paper"
    os.makedirs(root, exist_ok=True)
    seeds = [cfg.train.seed + i for i in range(d.seeds)]
    t_all, c_all, load0 = time.time(), _cpu(), os.getloadavg()
    heldout = _heldout(cfg, root)
    n_runs = 1 + len(seeds) * len(METHODS)

    wdir = os.path.join(root, "warmup")
    partial = os.path.join(root, "runs.partial.json")
    warmup, runs = _resumed(cfg, partial, wdir)
    n_resumed = len(runs)
    if warmup is None:
        print(f"[demo:paper] 1/{n_runs} warm-up (shared by every method and seed): SFT on levels "
              f"{d.warmup_levels} for {d.warmup_steps} steps")
        t0, c0 = time.time(), _cpu()
        Trainer(warmup_config(cfg, wdir, eval_path=heldout)).train()
        wev = [r for r in read_metrics(os.path.join(wdir, "metrics.jsonl")) if r.get("kind") == "eval"][-1]
        warmup = {"steps": d.warmup_steps, "acc": wev["eval/accuracy"], "wall_s": time.time() - t0,
                  "cpu_s": _cpu() - c0,
                  "acc_levels": {k.split("acc_level")[1]: v for k, v in wev.items() if k.startswith("eval/acc_level")}}

    todo = [(seed, m) for seed in seeds for m in METHODS
            if not any(r["seed"] == seed and r["method"] == m.key for r in runs)]   # all but a --resume's
    args = [(cfg, m, seed, os.path.join(root, f"seed{seed}", m.key), os.path.join(wdir, "final"), heldout)
            for seed, m in todo]

    def done(rec):
        runs.append(rec)
        print(f"[demo:paper] {len(runs) + 1}/{n_runs} done: seed {rec['seed']} {rec['label']}: held-out "
              f"{100 * rec['acc']:.1f}% ({rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU; "
              f"{time.time() - t_all:.0f} s so far)", flush=True)
        with open(partial, "w") as f:   # progress: --resume continues from here if the suite is cut short
            json.dump({"settings": _settings(cfg), "warmup": warmup, "runs": runs}, f)
    if d.jobs > 1 and len(args) > 1:
        # independent runs in worker processes (each with the environment's torch threads, e.g. 1)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(d.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            for fut in as_completed([ex.submit(_run_method, *a) for a in args]):
                done(fut.result())
    else:
        for a in args:
            print(f"[demo:paper] seed {a[2]}: {a[1].label} for {d.steps} steps", flush=True)
            done(_run_method(*a))
    runs.sort(key=lambda r: (r["seed"], [m.key for m in METHODS].index(r["method"])))

    summary = summarize(runs)
    verdict = ordering_verdict({k: summary[k]["acc_per_seed"] for k in PAPER})
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # CPU: summed over the records, each measured in the process that ran it (workers, a resumed suite);
    # wall: this invocation's elapsed time (resumed_runs > 0: earlier runs' wall is not in it)
    timing = {"wall_s": time.time() - t_all, "cpu_s": warmup["cpu_s"] + sum(r["cpu_s"] for r in runs),
              "resumed_runs": n_resumed,
              "process_wall_s": time.time() - t_all, "process_cpu_s": _cpu() - c_all, "rusage_user_s": ru.ru_utime,
              "rusage_sys_s": ru.ru_stime, "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
              "cpu_count": os.cpu_count()}
    timing["jobs"] = d.jobs
    timing["idle_wall_estimate_s"] = idle_estimate(warmup["cpu_s"], sum(r["cpu_s"] for r in runs), d.jobs)
    table = format_report(cfg, seeds, warmup, summary, verdict, timing)
    png = plot_bands(runs, os.path.join(root, "demo.png"), seeds, cfg)
    env = dict(run_environment(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"), processor=platform.processor(),
               commit=os.environ.get("UPG_COMMIT") or _git_commit())
    with open(os.path.join(root, "demo.json"), "w") as f:
        json.dump({"suite": "paper", "seeds": seeds, "config": cfg.to_dict(), "warmup": warmup, "runs": runs,
                   "summary": summary, "verdict": verdict, "timing": timing, "plot": png, "environment": env,
                   "paper": PAPER}, f, indent=2)
    with open(os.path.join(root, "demo.md"), "w") as f:
        f.write(table + "\n")
    if os.path.exists(partial):
        os.remove(partial)
    print("\n" + table)
    print(f"\nruns: {root}/seed<S>/<method>/metrics.jsonl; demo.json holds every run's numbers")
    return {"summary": summary, "verdict": verdict, "timing": timing, "runs": runs}


def idle_estimate(warmup_cpu_s: float, runs_cpu_s: float, jobs: int) -> dict:
    """An estimate (not a measurement) of the suite's wall time on an idle machine from CPU times: the
    warm-up runs alone, then the runs in ``jobs`` processes; with T torch threads a process on free cores
    takes about CPU / T. Model: warm-up CPU / T + runs' CPU / (T * min(jobs, cores / T)); exact for
    T = 1 and jobs <= cores up to scheduling and memory-bandwidth effects, a lower bound otherwise."""
    import torch
    t = torch.get_num_threads()
    par = max(1, min(jobs, (os.cpu_count() or 1) // t))
    return {"seconds": warmup_cpu_s / t + runs_cpu_s / (t * par), "torch_threads": t, "parallel_runs": par,
            "model": "warm-up CPU / threads + runs' CPU / (threads * min(jobs, cores / threads))"}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m.key]
        acc = [r["acc"] for r in rs]
        mean, h = mean_ci(acc)
        s = {"label": m.label, "acc_per_seed": acc, "acc_mean": mean, "acc_ci": h, "levels": {}}
        for lv in rs[0]["acc_levels"]:
            lm, lh = mean_ci([r["acc_levels"][lv] for r in rs])
            s["levels"][lv] = {"mean": lm, "ci": lh}
        for k in ("gradient_steps", "sampled_tokens", "demos_used", "demo_tokens_used", "wall_s", "cpu_s"):
            s[k] = sum(r[k] for r in rs) / len(rs)
        out[m.key] = s
    return out


def _pm(mean, h):
    return f"{100 * mean:.1f}" + (f" ± {100 * h:.1f}" if h is not None else "")


def format_report(cfg, seeds, warmup, summary, verdict, timing) -> str:
    d = cfg.demo
    levels = list(next(iter(summary.values()))["levels"])
    head = ["method", "paper (avg of 6)", "held-out acc"] + [f"L{lv}" for lv in levels] + \
        ["gradient steps", "sampled tokens", "demos (tokens)", "wall / run", "CPU / run"]
    lines = [f"Held-out greedy accuracy (%) after {d.steps} steps, mean ± 95% t-interval over {len(seeds)} seed(s) "
             f"{seeds}; {cfg.data.num_eval} fixed held-out problems of levels {list(d.levels)}; warm-up "
             f"{100 * warmup['acc']:.1f}% (levels: " +
             ", ".join(f"L{k} {100 * v:.1f}%" for k, v in warmup["acc_levels"].items()) + "). Budgets are per run "
             "(means over seeds).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        s = summary[m.key]
        cells = [m.label, f"{PAPER[m.key]:.1f}" if m.key in PAPER else "-", _pm(s["acc_mean"], s["acc_ci"])] + \
            [_pm(s["levels"][lv]["mean"], s["levels"][lv]["ci"]) for lv in levels] + \
            [f"{s['gradient_steps']:.0f}", f"{s['sampled_tokens']:.0f}",
             f"{s['demos_used']:.0f} ({s['demo_tokens_used']:.0f})", f"{s['wall_s']:.0f} s", f"{s['cpu_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    lab = _label
    lines += ["", "Paper ordering: " + " > ".join(f"{lab(k)} {PAPER[k]}" for k in PAPER_ORDER) + ".",
              "Here (mean held-out accuracy): " + " > ".join(
                  f"{lab(k)} {100 * summary[k]['acc_mean']:.1f}" for k in verdict["toy_order"]) + ".", "",
              "| pair (paper order) | paper diff | here: diff (paired 95% CI) | same order? | beyond the interval? "
              "| method intervals overlap? |", "|---|---|---|---|---|---|"]
    for p in verdict["pairs"]:
        ci = f" ± {100 * p['diff_ci']:.1f}" if p["diff_ci"] is not None else " (one seed: no interval)"
        sig = "-" if p["significant"] is None else ("yes" if p["significant"] else "no (within noise)")
        ov = "-" if p["intervals_overlap"] is None else ("yes" if p["intervals_overlap"] else "no")
        lines.append(f"| {lab(p['a'])} > {lab(p['b'])}{' (adjacent)' if p['adjacent'] else ''} | "
                     f"+{p['paper_diff']:.1f} | {100 * p['diff']:+.1f}{ci} | "
                     f"{'yes' if p['same_order'] else ('tie' if p['tie'] else 'NO')} | "
                     f"{sig} | {ov} |")
    lines += ["", f"{verdict['pairs_same_order']} of {verdict['num_pairs']} pairs in the paper's order "
              f"({verdict['pairs_tied']} tied); "
              f"{verdict['pairs_same_order_significant']} of them by more than the paired 95% interval; "
              f"{verdict['pairs_reversed_significant']} reversed by more than it.",
              "", f"Total: {timing['wall_s']:.0f} s wall" + (f" (this invocation; {timing['resumed_runs']} runs "
                                                          "came from an earlier one)" if timing["resumed_runs"] else "")
              + f", {timing['cpu_s']:.0f} s CPU time of the processes that ran the suite "
              f"(load average {timing['loadavg_start'][0]:.1f} at start, {timing['loadavg_end'][0]:.1f} at end, "
              f"{timing['cpu_count']} cores, {timing['jobs']} parallel run(s)); estimated idle wall "
              f"~{timing['idle_wall_estimate_s']['seconds']:.0f} s ({timing['idle_wall_estimate_s']['torch_threads']} "
              "torch thread(s) a process; an estimate from CPU time, not a measurement)."]
    return "\n".join(lines)


def plot_bands(runs: list[dict], png: str, seeds: list[int], cfg: Config):
    """Held-out accuracy (overall and per level) against the step, mean and 95% band over seeds."""
    try:
        from .plots import _pyplot
        plt = _pyplot()
    except ImportError:
        print("[demo:paper] matplotlib is not installed: no demo.png (pip install matplotlib); the table and "
              "demo.json are complete")
        return None
    keys = ["acc"] + sorted({k for r in runs for p in r["curve"] for k in p if k.startswith("acc_level")})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for ci, m in enumerate(METHODS):
            rs = [r for r in runs if r["method"] == m.key]
            steps = [p["step"] for p in rs[0]["curve"]]
            mean, lo, hi = [], [], []
            for j in range(len(steps)):
                mu, h = mean_ci([r["curve"][j][key] for r in rs])
                mean.append(100 * mu)
                lo.append(100 * max(0.0, mu - (h or 0)))     # accuracy lies in [0, 100]
                hi.append(100 * min(1.0, mu + (h or 0)))
            ax.plot(steps, mean, marker="o", ms=3, color=f"C{ci}", label=m.label)
            ax.fill_between(steps, lo, hi, color=f"C{ci}", alpha=0.15)
        ax.set_title("held-out accuracy" if key == "acc" else f"level {key.split('acc_level')[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
    fig.suptitle(f"embedded task, HPT paper's methods from one warm-up: mean and 95% band over {len(seeds)} "
                 f"seed(s)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
