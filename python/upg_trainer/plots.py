"""PNG plots from ``metrics.jsonl`` (matplotlib, Agg backend)."""
from __future__ import annotations

from .checkpoint import read_metrics

PANELS = [  # (title, [(kind, key, label)])
    ("reward", [("train", "reward", "train reward")]),
    ("accuracy", [("train", "accuracy", "train rollouts"), ("eval", "eval/accuracy", "held-out (greedy)")]),
    ("loss", [("train", "loss", "loss")]),
    ("entropy", [("train", "entropy_mean", "entropy")]),
    ("KL", [("train", "kl_mean", "KL to ref")]),
    ("clip fraction", [("train", "clip_frac", "clip frac")]),
    ("SFT share", [("train", "sft_share", "share of prompts trained by SFT")]),
    ("grad norm", [("train", "grad_norm", "grad norm")]),
]


def _series(rows, kind, key):
    pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _draw(ax, x, y, kind, label, color=None):
    if x:
        ax.plot(x, y, marker="o" if kind == "eval" else None, ms=3, label=label, color=color)


def _finish(ax, title):
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.lines:
        ax.legend(fontsize=7)


def _save(plt, fig, title, png_path):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def plot_metrics(metrics_path: str, png_path: str, title: str = "") -> str:
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (name, series) in zip(axes.flat, PANELS):
        for kind, key, label in series:
            _draw(ax, *_series(rows, kind, key), kind, label)
        _finish(ax, name)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(plt, fig, title, png_path)


COMPARISON_PANELS = [("eval", "eval/accuracy", "held-out accuracy (greedy)"), ("train", "reward", "train reward"),
                     ("train", "loss", "loss"), ("train", "entropy_mean", "entropy"),
                     ("train", "sft_share", "SFT share"), ("train", "clip_frac", "clip fraction")]


def plot_comparison(runs: dict, png_path: str, title: str = "", panels=None) -> str:
    """One figure comparing several runs: {name: metrics.jsonl path}. A run keeps one colour in every
    panel (its position in ``runs``), also in panels where earlier runs logged nothing."""
    plt = _pyplot()
    keys = panels or COMPARISON_PANELS
    rows = {name: read_metrics(path) for name, path in runs.items()}   # each file read once
    colors = {name: f"C{i % 10}" for i, name in enumerate(rows)}
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(14, 7))
    for ax, (kind, key, label) in zip(axes.flat, keys):
        for name, r in rows.items():
            _draw(ax, *_series(r, kind, key), kind, name, color=colors[name])
        _finish(ax, label)
    return _save(plt, fig, title, png_path)
