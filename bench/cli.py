"""``python -m bench``: side-by-side benchmark of our fused losses against the peers.

Example (GPU)::

    python -m bench --ops sft,grpo --shapes llama3-8b,qwen2.5-7b,gemma2-2b --modes fwd+bwd

Example (CPU smoke)::

    python -m bench --shapes tiny --ops sft,grpo --iters 3 --out /tmp/bench
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from upg_kernels import settings

from . import report
from .impls import DEFAULT_IMPLS, REGISTRY, make_impls
from .measure import (FLOP_MODEL, MODES, call, free, is_oom, matmul_peak, peak_memory, sync, time_impl,
                      time_interleaved, useful_flops)
from .problems import DTYPES, OPS, make_inputs, make_problem, reference, rel_err
from .shapes import NAMED, resolve_shapes

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark upg-kernels against PyTorch eager, torch.compile, Liger-Kernel and "
                    "Cut Cross-Entropy: time (median, p10/p90), peak memory above the inputs, "
                    "TFLOP/s against a matmul ceiling measured in the same run, error against float64.")
    p.add_argument("--ops", default="sft,grpo", help=f"comma list of {', '.join(OPS)} (or 'all')")
    p.add_argument("--modes", default="fwd+bwd", help=f"comma list of {', '.join(MODES)} (or 'all')")
    p.add_argument("--shapes", default=None,
                   help=f"comma list of named shapes ({', '.join(NAMED)}) or 'all' (the yardsticks, docs/design.md §3); "
                        "default: llama3-8b,qwen2.5-7b,gemma2-2b on CUDA, tiny on CPU")
    p.add_argument("--H", type=int, default=None, help="custom shape: hidden size (with --V)")
    p.add_argument("--V", type=int, default=None, help="custom shape: vocabulary size (with --H)")
    p.add_argument("--N", default=None,
                   help="token counts, comma list: overrides each named shape's default; 'table' = every "
                        "count the yardstick table lists; also the custom shape's N (default 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence T (default min(N, 512))")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt G (grpo, hpt)")
    p.add_argument("--zero-adv-frac", type=float, default=0.0,
                   help="fraction of the groups given advantage 0 (equal rewards; grpo, hpt): the "
                        "backward of 'ours' skips their rows")
    p.add_argument("--dtype", default="bf16", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                   help=f"comma list of {', '.join(REGISTRY)} (or 'all'); default {','.join(DEFAULT_IMPLS)}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default 2; 1 with --quick)")
    p.add_argument("--iters", type=int, default=None,
                   help="fixed timed iterations per row (default: fill --row-budget, within 5..100; 5..20 with --quick)")
    p.add_argument("--row-budget", type=float, default=None,
                   help="seconds of timed iterations per row (default 2.0; 0.5 with --quick)")
    p.add_argument("--rotate", type=int, default=None,
                   help="input sets to rotate over (default 3 on CUDA, 2 on CPU; 2 with --quick)")
    p.add_argument("--no-ref", action="store_true", help="skip the float64 reference and error check")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul ceiling measurement")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from start after which remaining rows are reported 'skipped: time budget'")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations and input sets: a whole GPU run in a few minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results/<date>-<device>/)")
    p.add_argument("--render", default=None, metavar="RESULTS_JSON",
                   help="only re-make results.md and results.png from a results.json, then exit")
    p.add_argument("--list", action="store_true", help="list shapes and implementations, then exit")
    p.add_argument("--memory-model", action="store_true",
                   help="trace each implementation's allocations at the shapes on the meta device "
                        "(no GPU, nothing computed): peak extra bytes to DIR/memory.json and "
                        "memory.md (default shapes: all, N: table, ops: logprobs,grpo,sft)")
    return p


def _split(text: str, allowed, what: str) -> list[str]:
    items = [s for s in text.replace(" ", "").split(",") if s]
    if items == ["all"]:
        return list(allowed)
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"bench: unknown {what} {bad}; known: {', '.join(allowed)}")
    return items


def _git() -> tuple[str | None, bool | None]:
    """(commit, dirty). Where the checkout has no git metadata (a copied working tree), the commit
    comes from UPG_BENCH_GIT_COMMIT, set by whoever copied it, and dirty is unknown (None)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                           timeout=10)
        commit = r.stdout.strip() if r.returncode == 0 else ""
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip() != ""
            return commit, dirty
    except Exception:
        pass
    return settings.BENCH_GIT_COMMIT.get(), None


def _driver() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except Exception:
        return None


def _ver(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-") or "cuda"


def collect_meta(device: torch.device, args, argv) -> dict:
    commit, dirty = _git()
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "driver": _driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _ver("triton"),
        "liger_kernel": _ver("liger-kernel"),
        "cut_cross_entropy": _ver("cut-cross-entropy"),
        "upg_kernels": _ver("upg-kernels"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in argv),
        "triton_interpret": settings.TRITON_INTERPRET.raw() or "0",
        "flop_model": FLOP_MODEL,
        "timing": ("CUDA events around each timed call, after warm-up, inputs rotating over "
                   f"{args.rotate} input sets; median and p10/p90 of the per-call times"
                   if device.type == "cuda" else
                   "time.perf_counter around each call (CPU), after warm-up; median and p10/p90"),
        "memory": ("torch.cuda.max_memory_allocated during one call minus memory_allocated just before "
                   "it (inputs excluded; returned gradients, saved activations and workspaces counted); "
                   "fwd rows: the forward as in training (inputs require grad); bwd rows: the forward "
                   "and backward call" if device.type == "cuda" else
                   "peak live bytes of the tensors torch ops create during one call, traced by "
                   "bench.memtrace.AllocTracer (inputs excluded; returned gradients and saved tensors "
                   "counted; scratch inside one aten kernel not seen; n/a for torch.compile)"),
        "error_model": ("relative L2 error ||x - ref|| / ||ref|| of dhidden, dweight and (logprobs) the "
                        "log-probs, |loss - ref| / max(|ref|, 1) of a scalar loss, against a float64 reference over "
                        "the FULL batch (computed chunked over tokens), on input set 0; 'rel err' = the "
                        "largest of the three" if not args.no_ref else "not computed (--no-ref)"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("render", "list")},
        "impl_descriptions": {name: cls.description for name, cls in REGISTRY.items()},
    }
    return meta


def _row_base(problem, mode, impl_name, nbytes):
    s = problem.shape
    return {"op": problem.op, "mode": mode, "shape": s.name, "H": s.H, "V": s.V, "N": problem.N,
            "B": problem.B, "T": problem.T, "group_size": problem.G, "dtype": problem.dtype,
            "zero_adv_frac": problem.zero_adv_frac,
            "impl": impl_name, "detail": "", "status": "ok", "inputs_bytes": nbytes,
            "useful_flops": useful_flops(mode, problem.N, s.H, s.V)}


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def run(args, argv) -> dict:
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    quick = args.quick
    if args.warmup is None:
        args.warmup = 1 if quick else 2
    if args.row_budget is None:
        args.row_budget = 0.5 if quick else 2.0
    if args.rotate is None:
        args.rotate = 2 if (quick or not cuda) else 3
    if args.shapes is None and args.H is None:
        args.shapes = "llama3-8b,qwen2.5-7b,gemma2-2b" if cuda else "tiny"
    t_start = time.monotonic()
    deadline = t_start + args.deadline if args.deadline else None

    ops = _split(args.ops, OPS, "op")
    modes = _split(args.modes, MODES, "mode")
    dtypes = _split(args.dtype, list(DTYPES), "dtype")
    try:
        shapes = resolve_shapes(args.shapes, args.H, args.V, args.N)
        impls = make_impls(args.impls)
    except ValueError as e:
        raise SystemExit(f"bench: {e}")

    meta = collect_meta(device, args, argv)
    if args.out:
        out_dir = Path(args.out)
    else:
        out_dir = REPO / "bench" / "results" / f"{_dt.date.today().isoformat()}-{device_slug(device)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    print("\n".join(["python -m bench"] + [f"  {ln}" for ln in report.header_lines(meta)[:2]]), flush=True)

    if not args.no_peak:
        meta["matmul_peak"] = matmul_peak(device)
        pk = meta["matmul_peak"]
        print(f"  matmul ceiling: {pk['n']}^3 {pk['dtype']} = {pk['tflops']:.1f} TFLOP/s "
              f"({pk['median_ms']:.3f} ms)", flush=True)
    peak_tflops = (meta.get("matmul_peak") or {}).get("tflops")

    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        cells = report.row_cells(row)
        print(f"  [+{time.monotonic() - t_start:6.1f}s] " + " | ".join(cells), flush=True)
        report.write_json(meta, rows, out_dir)

    def out_of_time():
        return deadline is not None and time.monotonic() > deadline

    for op in ops:
        for shape in shapes:
            for dt in dtypes:
                try:
                    problem = make_problem(op, shape, dt, args.seq_len, args.group_size,
                                           args.zero_adv_frac)
                except ValueError as e:
                    raise SystemExit(f"bench: {e}")
                if out_of_time():
                    for mode in modes:
                        for impl in impls:
                            r = _row_base(problem, mode, impl.name, None)
                            r["status"] = "skipped: time budget"
                            emit(r)
                    continue
                _run_problem(problem, modes, impls, device, args, emit, out_of_time, peak_tflops)
                free(device)

    meta["elapsed_s"] = time.monotonic() - t_start
    files = report.write_all(meta, rows, out_dir)
    print()
    print("\n".join(report.header_lines(meta)))
    print(report.terminal_table(rows))
    print(f"\nwrote: {', '.join(files.values())}", flush=True)
    return {"meta": meta, "rows": rows, "files": files, "out_dir": str(out_dir)}


def _run_problem(problem, modes, impls, device, args, emit, out_of_time, peak_tflops):
    sets, nbytes = [], None
    t0 = time.perf_counter()
    try:
        for k in range(args.rotate):
            sets.append(make_inputs(problem, device, seed=args.seed + k))
        nbytes = sets[0].nbytes()
    except Exception as e:
        status = "oom (making inputs)" if is_oom(e) else f"error (making inputs): {_short(e)}"
        for mode in modes:
            for impl in impls:
                r = _row_base(problem, mode, impl.name, None)
                r["status"] = status
                emit(r)
        return

    # per-impl availability, preparation, and (optionally) the accuracy check on input set 0
    state: dict[str, dict] = {}
    ref = None
    t_inputs = time.perf_counter() - t0
    if not args.no_ref and not out_of_time():
        try:
            t0 = time.perf_counter()
            ref = reference(problem.op, sets[0])
            sync(device)
            print(f"  {problem.op} {problem.shape.label} {problem.dtype}: {args.rotate} input sets "
                  f"{t_inputs:.1f} s, float64 reference {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:
            print(f"  reference failed: {_short(e)}", flush=True)
            ref = None
            free(device)
    for impl in impls:
        st = {"status": impl.status(problem.op, device), "err": None, "note": None}
        state[impl.name] = st
        if st["status"] is not None:
            continue
        if out_of_time():
            st["status"] = "skipped: time budget"
            continue
        try:
            impl.prepare(problem, device)
            st["detail"] = impl.detail
        except Exception as e:
            st["status"] = f"error (prepare): {_short(e)}"
            continue
        if ref is None:
            continue
        try:
            t0 = time.perf_counter()
            out, dh, dw = call(impl, problem.op, sets[0], "fwd+bwd")
            sync(device)
            st["first_call_s"] = time.perf_counter() - t0
            print(f"    {impl.name}: first fwd+bwd call {st['first_call_s']:.1f} s", flush=True)
            st["err"] = {"out": rel_err(out, ref["out"]), "dhidden": rel_err(dh, ref["dhidden"]),
                         "dweight": rel_err(dw, ref["dweight"])}
            del out, dh, dw
        except Exception as e:
            if is_oom(e):
                st["note"] = "accuracy check: out of memory"
            else:
                st["status"] = f"error: {_short(e)}"
                traceback.print_exc()
        free(device)
    ref = None
    free(device)

    for mode in modes:
        inter = {}
        runnable = [impl for impl in impls if state[impl.name]["status"] is None]
        if device.type == "cpu" and len(runnable) > 1 and not out_of_time():
            # CPU: interleaved rounds (a shared machine's load changes hit every impl alike)
            inter = time_interleaved(runnable, problem.op, sets, mode, device, warmup=args.warmup,
                                     budget_s=args.row_budget, **_iters_kw(args))
            for name, t in inter.items():
                if t.get("pair_ratios"):
                    pr = sorted(t["pair_ratios"])
                    print(f"    {mode} {name}: per-round ratio to {runnable[0].name} min {pr[0]:.3f} "
                          f"median {pr[len(pr) // 2]:.3f} ({len(pr)} rounds, interleaved)", flush=True)
        for impl in impls:
            st = state[impl.name]
            r = _row_base(problem, mode, impl.name, nbytes)
            r["detail"] = st.get("detail", "")
            r["err"] = st["err"]
            if st["err"]:
                vals = [v for v in st["err"].values() if v is not None]
                r["err_max"] = max(vals) if vals else None
            if st.get("note"):
                r["note"] = st["note"]
            if st.get("first_call_s") is not None:
                r["first_call_s"] = st["first_call_s"]  # fwd+bwd, compile / autotune included
            if st["status"] is not None:
                r["status"] = st["status"]
                emit(r)
                continue
            if out_of_time():
                r["status"] = "skipped: time budget"
                emit(r)
                continue
            try:
                t_row = time.perf_counter()
                if impl.name in inter:
                    t = inter[impl.name]
                    if "error" in t:
                        raise t["error"]
                else:
                    t = time_impl(impl, problem.op, sets, mode, device, warmup=args.warmup,
                                  budget_s=args.row_budget, **_iters_kw(args))
                r.update(t)
                r["tflops"] = r["useful_flops"] / (r["median_ms"] * 1e-3) / 1e12
                r["frac_peak"] = r["tflops"] / peak_tflops if peak_tflops else None
                r["mem_peak_bytes"] = peak_memory(impl, problem.op, sets[0], mode, device)
                r["row_wall_s"] = time.perf_counter() - t_row  # warm-up, timing and memory call
            except Exception as e:
                if is_oom(e):
                    r["status"] = "oom"
                else:
                    r["status"] = f"error: {_short(e)}"
                    traceback.print_exc()
                for k in ("times_ms", "median_ms"):
                    r.pop(k, None)
            free(device)
            sync(device)
            emit(r)
    del sets


def _iters_kw(args) -> dict:
    if args.iters:
        return dict(min_iters=args.iters, max_iters=args.iters)
    return dict(min_iters=5, max_iters=20 if args.quick else 100)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.list:
        print("shapes (H, V, N: the yardsticks of docs/design.md §3; the first N is the default):")
        for name, (H, V, Ns) in NAMED.items():
            print(f"  {name:14s} H={H:<6d} V={V:<7d} N={','.join(map(str, Ns))}")
        print("implementations:")
        for name, cls in REGISTRY.items():
            print(f"  {name:12s} {cls.description}{'  [default]' if name in DEFAULT_IMPLS else ''}")
        print(f"ops: {', '.join(OPS)}\nmodes: {', '.join(MODES)}\ndtypes: {', '.join(DTYPES)}")
        return 0
    if args.memory_model:
        from . import memory_model
        return memory_model.main(args, argv)
    if args.render:
        files = report.render(args.render, args.out)
        print(f"wrote: {', '.join(files.values())}")
        return 0
    run(args, argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
