"""Output: terminal table, JSON (everything, raw per-iteration times included), markdown, PNG plots."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

JSON_NAME = "results.json"
MD_NAME = "results.md"
PNG_NAME = "results.png"


def _f(v, fmt="{:.2f}", none="-"):
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return fmt.format(v)


def _gib(b):
    return None if b is None else b / 2 ** 30


def _err(row):
    e = row.get("err_max")
    return _f(e, "{:.1e}")


COLUMNS = ("op", "mode", "shape", "dtype", "impl", "status", "median ms", "p10-p90 ms", "TFLOP/s",
           "% peak", "peak mem GiB", "rel err")


def row_cells(r: dict) -> list[str]:
    ok = r.get("status") == "ok"
    spread = f"{_f(r.get('p10_ms'))}-{_f(r.get('p90_ms'))}" if ok else "-"
    pct = None if r.get("frac_peak") is None else 100 * r["frac_peak"]
    return [r["op"], r["mode"], f"{r['shape']} N={r['N']}", r["dtype"], r["impl"], r["status"],
            _f(r.get("median_ms")) if ok else "-", spread, _f(r.get("tflops"), "{:.1f}") if ok else "-",
            _f(pct, "{:.1f}") if ok else "-", _f(_gib(r.get("mem_peak_bytes")), "{:.2f}", "n/a"),
            _err(r)]


def terminal_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header_lines(meta: dict) -> list[str]:
    peak = meta.get("matmul_peak") or {}
    out = [
        f"device: {meta.get('device')} | driver {meta.get('driver')} | torch {meta.get('torch')} | "
        f"triton {meta.get('triton')} | liger-kernel {meta.get('liger_kernel')} | "
        f"cut-cross-entropy {meta.get('cut_cross_entropy')}",
        f"commit {meta.get('git_commit')}"
        f"{' (dirty tree)' if meta.get('git_dirty') else (' (tree state unknown)' if meta.get('git_dirty') is None else '')} | "
        f"date {meta.get('date')} | python {meta.get('python')}",
    ]
    if peak:
        out.append(f"matmul ceiling measured in this run: {peak.get('n')}^3 {peak.get('dtype')} matmul, "
                   f"{_f(peak.get('median_ms'), '{:.3f}')} ms = {_f(peak.get('tflops'), '{:.1f}')} TFLOP/s "
                   f"(the '% peak' column divides every row by this bf16 ceiling, fp32 rows included)")
    out.append(f"FLOP model: {meta.get('flop_model')}")
    out.append(f"timing: {meta.get('timing')}")
    out.append(f"memory: {meta.get('memory')}")
    out.append(f"error: {meta.get('error_model')}")
    if meta.get("device_type") != "cuda":
        out.append("NOTE: CPU run: smoke numbers only, not performance claims.")
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# upg-kernels benchmark: {meta.get('device')} ({meta.get('date')})", ""]
    lines += [f"- {h}" for h in header_lines(meta)]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |")
    lines += ["", "## Implementations", ""]
    seen = set()
    for r in rows:
        key = (r["impl"], r["op"])
        if key in seen or not r.get("detail"):
            continue
        seen.add(key)
        lines.append(f"- `{r['impl']}` / {r['op']}: {r['detail']}")
    errs = [r for r in rows if r.get("err")]
    if errs:
        lines += ["", "## Errors against the float64 reference (relative L2; scalar loss: |l - ref| / max(|ref|, 1))", "",
                  "| op | shape | dtype | impl | out | dhidden | dweight |", "|---|---|---|---|---|---|---|"]
        seen = set()
        for r in errs:
            key = (r["op"], r["shape"], r["N"], r["dtype"], r["impl"])
            if key in seen:
                continue
            seen.add(key)
            e = r["err"]
            lines.append(f"| {r['op']} | {r['shape']} N={r['N']} | {r['dtype']} | {r['impl']} | "
                         f"{_f(e.get('out'), '{:.1e}')} | {_f(e.get('dhidden'), '{:.1e}')} | "
                         f"{_f(e.get('dweight'), '{:.1e}')} |")
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list[dict], path: str | os.PathLike) -> str | None:
    """One PNG: a row of two panels (time, peak memory) per (op, mode, dtype); x = shapes, one bar per
    implementation; rows without a number get a labelled gap."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"bench: no {PNG_NAME} ({e}); install matplotlib (pip install matplotlib) for the plot",
              file=sys.stderr)
        return None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    if not groups:
        return None
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(impls)}
    panels = [("median_ms", 1.0, "median time (ms), p10-p90 bars")]
    if any(r.get("mem_peak_bytes") is not None for r in rows):
        panels.append(("mem_peak_bytes", 2 ** -30, "peak memory above inputs (GiB)"))
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(max(9.0, 6.5 * len(panels)), 3.6 * len(groups)),
                             squeeze=False)
    for gi, ((op, mode, dt), rs) in enumerate(groups.items()):
        shapes = list(dict.fromkeys((r["shape"], r["N"]) for r in rs))
        g_impls = [n for n in impls if any(r["impl"] == n for r in rs)]
        width = 0.8 / max(1, len(g_impls))
        for col, (key, scale, ylabel) in enumerate(panels):
            ax = axes[gi][col]
            for ii, name in enumerate(g_impls):
                for si, sh in enumerate(shapes):
                    match = [r for r in rs if r["impl"] == name and (r["shape"], r["N"]) == sh]
                    if not match:
                        continue
                    r = match[0]
                    xpos = si - 0.4 + width * (ii + 0.5)
                    v = r.get(key) if r.get("status") == "ok" else None
                    if v is None:
                        label = str(r.get("status", "")).split(":")[0] if r.get("status") != "ok" else "-"
                        ax.text(xpos, 0, f"{name} {label}", ha="center", va="bottom", fontsize=6,
                                color=colors[name], rotation=90)
                        continue
                    yerr = None
                    if key == "median_ms" and r.get("p10_ms") is not None:
                        yerr = [[max(0.0, v - r["p10_ms"])], [max(0.0, r["p90_ms"] - v)]]
                    ax.bar(xpos, v * scale, width, color=colors[name], yerr=yerr, capsize=2, label=name)
            ax.set_xlim(-0.5, len(shapes) - 0.5)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{n}\nN={N}" for n, N in shapes], fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{op} {mode} {dt}", fontsize=9)
            handles, labels = ax.get_legend_handles_labels()
            uniq = dict(zip(labels, handles))
            if uniq:
                ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.suptitle(f"upg-kernels bench on {meta.get('device')} ({meta.get('date')}, commit "
                 f"{str(meta.get('git_commit'))[:10]})\nno bar: the row's status is written in its place (see the table)"
                 + ("; CPU: smoke numbers, not performance claims" if meta.get("device_type") != "cuda" else ""),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / (3.6 * len(groups))))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_json(meta: dict, rows: list[dict], out_dir: str | os.PathLike) -> str:
    p = Path(out_dir) / JSON_NAME
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    tmp.replace(p)
    return str(p)


def write_all(meta: dict, rows: list[dict], out_dir: str | os.PathLike) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(meta, rows, out_dir)}
    (out_dir / MD_NAME).write_text(markdown(meta, rows))
    files["md"] = str(out_dir / MD_NAME)
    png = plot(meta, rows, out_dir / PNG_NAME)
    if png:
        files["png"] = png
    return files


def write_table(out_dir: str | os.PathLike, stem: str, records, title: str, note: str, md: str) -> Path:
    """``out_dir/stem.json`` (the records) and ``out_dir/stem.md`` (``# title``, ``note``, the markdown
    table ``md``) of a side study (memory model, dW rounding); returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1))
    (out / f"{stem}.md").write_text(f"# {title}\n\n{note}\n\n{md}\n")
    return out


def render(json_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Re-make the markdown and the PNG from a results JSON (e.g. after a run was cut short)."""
    data = json.loads(Path(json_path).read_text())
    return write_all(data["meta"], data["rows"], out_dir or Path(json_path).parent)
