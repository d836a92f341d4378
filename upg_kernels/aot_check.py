"""Ahead-of-time compile check of every registered Triton kernel variant, on a machine without a GPU.

    python -m upg_kernels.aot_check --arch sm_80,sm_90 [--max-spills 0] [--json FILE] [--only NAME]

For each variant of each module in :data:`upg_kernels.kernels.TRITON_KERNEL_MODULES` (their
``aot_variants()``, see :mod:`upg_kernels.kernels.aot`) and each architecture, it runs
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
options={"num_warps", "num_stages"})`` -- the full pipeline down to ptxas (bundled with triton) --
and reads registers, spills and the stack frame from ptxas' ``-v`` report, shared memory from the
kernel's metadata. It prints a table and exits 1 on a compile error or when a variant spills more
than ``--max-spills`` bytes of spill stores (default :data:`MAX_SPILLS` = 64, see there), 2 on a
usage error.

The interpreter must be off: ``TRITON_INTERPRET`` is removed from the environment before triton is
imported (the test suite runs this in a subprocess). Each worker compiles into its own empty
triton cache, so ptxas always runs (a cache hit has no ptxas report) and times are real.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


# Spill stores (bytes per thread) tolerated per variant: 16 32-bit values. ptxas moves a few
# loop-invariant values (pointers, scalars) to local memory when a tile leaves no registers; that is
# cheap. A tile that does not fit spills hundreds of bytes to 1+ KB (the odd-H configs did before
# they got their own block sizes), which this catches.
MAX_SPILLS = 64


@dataclass
class Result:
    module: str
    kernel: str
    variant: str
    arch: str
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    seconds: float = 0.0
    error: str = ""


def _variants(module: str):
    mod = importlib.import_module(f"upg_kernels.kernels.{module}")
    if not hasattr(mod, "aot_variants"):
        raise AttributeError(f"upg_kernels.kernels.{module} is listed in TRITON_KERNEL_MODULES but "
                             "defines no aot_variants() (see CONTRIBUTING.md)")
    return mod.aot_variants()


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="upg-aot-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the default; silences 3.9's warning


def _compile(job) -> Result:
    module, index, arch = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    v = _variants(module)[index]
    r = Result(module, v.name, v.variant, arch, v.num_warps, v.num_stages)
    knobs.nvidia.dump_ptxas_log = True          # ptxas -v report printed to stdout
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(v.kernel, v.signature(), v.constants(), v.attrs())
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", int(arch[3:]), 32),
                               options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        r.shared = int(k.metadata.shared)
        text = log.getvalue()
        for key, rx in PTXAS_RE.items():
            m = rx.search(text)
            if m is None:
                raise RuntimeError(f"no '{rx.pattern}' in the ptxas report: {text[-500:]!r}")
            setattr(r, key, int(m.group(1)))
    except Exception as e:  # noqa: BLE001 -- every failure is a reported result
        r.error = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    r.seconds = round(time.perf_counter() - t0, 2)
    return r


def collect(only=None):
    """``[(module, index, variant)]`` of the registered variants (``only``: kernel/module names)."""
    from upg_kernels.kernels import TRITON_KERNEL_MODULES
    jobs = []
    for module in TRITON_KERNEL_MODULES:
        for i, v in enumerate(_variants(module)):
            if only and module not in only and v.name not in only:
                continue
            jobs.append((module, i, v))
    return jobs


def table(results) -> str:
    head = (f"{'kernel':<20} {'variant':<40} {'arch':<6} {'warps':>5} {'stg':>3} {'regs':>4} "
            f"{'spillST':>7} {'spillLD':>7} {'stack':>5} {'shared':>7} {'sec':>5}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.kernel:<20} {r.variant[:40]:<40} {r.arch:<6} {r.num_warps:>5} "
                     f"{r.num_stages:>3} {r.registers:>4} {r.spill_stores:>7} {r.spill_loads:>7} "
                     f"{r.stack:>5} {r.shared:>7} {r.seconds:>5.1f}  "
                     f"{'ERROR' if r.error else 'ok'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m upg_kernels.aot_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    ap.add_argument("--max-spills", type=int, default=MAX_SPILLS,
                    help=f"largest allowed spill-store bytes per variant (default {MAX_SPILLS})")
    ap.add_argument("--json", help="write the results as a JSON list to this file")
    ap.add_argument("--only", action="append", default=[],
                    help="kernel or module name (repeatable, or comma-separated)")
    ap.add_argument("--variant", default=None,
                    help="regular expression: compile only the variants whose name matches")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    a = ap.parse_args(argv)
    archs = [x.strip() for x in a.arch.split(",") if x.strip()]
    bad = [x for x in archs if not re.fullmatch(r"sm_\d{2,3}", x)]
    if bad or not archs:
        ap.error(f"--arch takes names like sm_80,sm_90, got {a.arch!r}")
    only = {x.strip() for o in a.only for x in o.split(",") if x.strip()}

    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    jobs = collect(only)
    if only and not jobs:
        ap.error(f"--only {sorted(only)} matches no registered kernel or module")
    if a.variant:
        jobs = [j for j in jobs if re.search(a.variant, j[2].variant)]
        if not jobs:
            ap.error(f"--variant {a.variant!r} matches no variant")
    work = [(m, i, arch) for m, i, _ in jobs for arch in archs]
    print(f"aot_check: triton {triton.__version__} ({os.path.dirname(triton.__file__)}), "
          f"{len(jobs)} variants x {len(archs)} archs, {a.jobs} processes", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, a.jobs), initializer=_init_worker) as ex:
        results = list(ex.map(_compile, work))
    wall = time.perf_counter() - t0
    print(table(results))
    failed = [r for r in results if r.error or r.spill_stores > a.max_spills]
    for r in failed:
        why = r.error or f"{r.spill_stores} bytes of spill stores > --max-spills {a.max_spills}"
        print(f"FAIL {r.kernel} [{r.variant}] {r.arch}: {why}", file=sys.stderr)
    print(f"aot_check: {len(results)} compiles in {wall:.1f} s "
          f"(sum {sum(r.seconds for r in results):.1f} s), {len(failed)} failed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**asdict(r), "triton": triton.__version__} for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
