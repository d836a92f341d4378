"""The memory model: peak extra bytes of each implementation at the real shapes, without a GPU.

    python -m bench --memory-model [--shapes all] [--N table] [--ops logprobs,grpo,sft] --out DIR

Each implementation runs forward + backward on ``meta`` tensors (shapes only, nothing computed,
kernel launches skipped) under :class:`bench.memtrace.AllocTracer`, which tracks the bytes of every
storage that torch ops allocate and free.

Accounting (the same for every implementation): the inputs (hidden [N, H], weight [V, H], targets,
mask, advantages, old log-probs, upstream gradient) exist before the trace and are not counted; the
gradients every implementation must return -- ``hidden.grad`` [N, H] and ``weight.grad`` [V, H] in
the inputs' dtype -- are subtracted. So

    peak_extra_bytes = max over the trace of (bytes allocated and still live
                                              - bytes of hidden.grad, weight.grad allocated by then)

i.e. everything an implementation holds beyond its inputs and its outputs: logits, softmax
buffers, float32 accumulators, chunk workspaces, partials, index lists. Output log-probs / loss
scalars are counted (they are small).

Rows whose implementation cannot run on ``meta`` (Triton kernels launched from library code we do
not control) are reported with ``peak_extra_bytes: null`` and the reason; none is dropped.
"""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from upg_kernels import settings
from upg_kernels.kernels import paths
from upg_kernels.kernels.backends import BACKENDS, FORWARD_PATHS

from .impls import CCE, Eager, Impl, Liger, Ours, environ, objective
from .memtrace import AllocTracer
from .problems import DTYPES, Inputs, make_problem
from .report import write_table
from .shapes import resolve_shapes

MEMORY_OPS = ("logprobs", "grpo", "sft")
DEFAULT_SHAPES = "all"
DEFAULT_N = "table"


@dataclass(frozen=True)
class OursPath:
    """One of our code paths: the memory-model name (``ours-...``), its backend (a row of the backend
    table), whether it is a default path (``backend="auto"`` on CUDA; the memory test asserts the 1%
    goal for those), and environment settings it runs under."""
    name: str
    backend: str
    default: bool
    env: tuple[tuple[str, str], ...] = ()
    kw: tuple[tuple[str, str], ...] = ()     # keyword arguments of the loss calls


def _ours_paths() -> tuple[OursPath, ...]:
    """Our paths, from the backend table (kernels/backends.py): ``ours-<backend>`` for each row, and
    ``ours-<backend>-<path short>`` for each other forward path of the CUDA default."""
    out = []
    for b in BACKENDS.values():
        default = "cuda" in b.auto_on
        out.append(OursPath(f"ours-{b.name}", b.name, default))
        if default:
            out += [OursPath(f"ours-{b.name}-{FORWARD_PATHS[f].short}", b.name, False,
                             env=((settings.TRITON_FORWARD.name, f),)) for f in b.forwards[1:]]
    return tuple(out)


# the one-pass path (unified_policy_loss(path="one_pass"), asked for explicitly: a budget refusal is
# reported, not replaced by the two-pass path; token_logprobs is unchanged by it)
ONE_PASS = OursPath("ours-one-pass", "triton", False, kw=(("path", paths.ONE_PASS),))
# the same with dW as a compensated bf16 pair (UPG_KERNELS_ONE_PASS_DW=compensated) in a 2 GiB budget
ONE_PASS_PAIR = OursPath("ours-one-pass-compensated-2g", "triton", False,
                         env=((settings.ONE_PASS_DW.name, "compensated"),
                              (settings.ONE_PASS_BYTES.name, str(2 * 2**30))),
                         kw=(("path", paths.ONE_PASS),))
OURS_PATHS = _ours_paths() + (ONE_PASS, ONE_PASS_PAIR)


class _OursKw(Ours):
    """``Ours`` whose loss calls get the extra keyword arguments ``kw``."""
    kw: dict = {}

    def forward(self, op, x):
        return self.forward_kw(op, x, **(self.kw if op != "logprobs" else {}))


def _ours_impl(path: OursPath, backend: str) -> Impl:
    impl = _OursKw()
    impl.name = path.name
    impl.backend = backend
    impl.env = dict(path.env)
    impl.kw = dict(path.kw)
    return impl


def one_pass_budget(problem) -> dict:
    """The one-pass plan of ``problem`` (``one_pass.plan``, the GPU rules): ``{"budget_bytes",
    "plan_bytes"}`` (workspace + dW accumulator), or the plan's refusal as ``{"budget_bytes",
    "plan_refusal"}``."""
    from upg_kernels.kernels import one_pass
    s = problem.shape
    budget = one_pass.one_pass_bytes(torch.device("meta"))
    try:
        pl = one_pass.plan(s.N, s.H, s.V, DTYPES[problem.dtype], budget, gpu=True)
    except ValueError as e:
        acc = one_pass.acc_bytes(s.V, s.H, DTYPES[problem.dtype], one_pass.dw_mode())
        return {"budget_bytes": budget, "plan_refusal": str(e), "acc_bytes": acc}
    return {"budget_bytes": budget, "plan_bytes": pl.total_bytes, "chunk_rows": pl.chunk_rows,
            "n_chunks": pl.n_chunks, "acc_bytes": pl.acc_bytes, "dw_mode": pl.dw_mode}


def meta_inputs(problem, device="meta") -> Inputs:
    """Shape-only inputs of ``problem`` (the same tensors bench.problems.make_inputs builds)."""
    B, T, H, V = problem.B, problem.T, problem.shape.H, problem.shape.V
    dt = DTYPES[problem.dtype]
    kw = dict(device=device)
    return Inputs(
        hidden=torch.empty(B, T, H, dtype=dt, **kw).requires_grad_(True),
        weight=torch.empty(V, H, dtype=dt, **kw).requires_grad_(True),
        targets=torch.empty(B, T, dtype=torch.int64, **kw),
        mask=torch.empty(B, T, dtype=torch.float32, **kw),
        advantages=torch.empty(B, dtype=torch.float32, **kw),
        old_logprobs=torch.empty(B, T, dtype=torch.float32, **kw),
        is_demo=torch.empty(B, dtype=torch.bool, **kw),
        grad_out=torch.empty(B, T, dtype=torch.float32, **kw),
        group_size=problem.G)


@contextmanager
def gpu_planning():
    """Our launchers plan block configs, splits and slabs as on the GPU, also when the test suite
    has set TRITON_INTERPRET=1 (nothing is launched on meta). The kernel modules are imported
    first: ``@triton.jit`` decides at import whether a kernel is interpreted, and a kernel created
    here would stay compiled-only for the rest of the process."""
    from upg_kernels._backend import triton_available
    from upg_kernels.kernels import TRITON_KERNEL_MODULES
    if triton_available():
        for m in TRITON_KERNEL_MODULES:
            importlib.import_module(f"upg_kernels.kernels.{m}")
    with environ({"TRITON_INTERPRET": "0"}):
        yield


def trace_peak(impl: Impl, problem, device="meta") -> dict:
    """Run ``impl``'s forward + backward of ``problem`` under the tracer: ``{"peak_extra_bytes",
    "peak_bytes", "grad_bytes"}``. Raises what the implementation raises."""
    x = meta_inputs(problem, device)
    impl.prepare(problem, torch.device(device))
    with gpu_planning() if device == "meta" else nullcontext(), \
            environ(getattr(impl, "env", {})), \
            AllocTracer(meta_scalar=getattr(impl, "meta_scalar", None)) as t:
        out = impl.forward(problem.op, x)
        objective(problem.op, out, x).backward()
        grads = [p.grad for p in (x.hidden, x.weight)]
        if any(g is None for g in grads):
            raise RuntimeError("the backward did not produce both gradients")
        grad_bytes = sum(g.untyped_storage().nbytes() for g in grads)
    # the gradients are left out from their allocation on (before it they do not exist): an
    # implementation whose peak comes before its gradients are allocated is not credited with them
    extra = t.peak_without(grads)
    return {"peak_extra_bytes": extra, "peak_bytes": t.peak, "grad_bytes": grad_bytes}


def implementations(names=None) -> list[tuple[str, Impl | None, str]]:
    """``(name, impl or None, reason when None)`` in table order: eager, peers, ours."""
    liger = Liger()
    # Liger's GRPO computes its gradients in the forward; the backward then asks
    # ``grad_output != 1.0`` as a Python bool, which is False for loss.backward(): answered so
    liger.meta_scalar = False
    peers = [("eager", Eager()), ("liger", liger), ("cce", CCE())]
    ours = []
    for p in OURS_PATHS:
        ours.append((p.name, _ours_impl(p, p.backend), ""))
    rows = [(n, i, "") for n, i in peers] + ours
    if names:
        want = [s for s in names.split(",") if s]
        unknown = [w for w in want if w not in {r[0] for r in rows}]
        if unknown:
            raise ValueError(f"unknown memory-model impl(s) {unknown}; known: {[r[0] for r in rows]}")
        rows = [r for r in rows if r[0] in want]
    return rows


def _why(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"not traceable: {type(e).__name__}: {msg[:160]}"


def run(shapes=DEFAULT_SHAPES, N=DEFAULT_N, ops="logprobs,grpo", impls=None, dtype="bf16",
        seq_len=None, group_size=8) -> list[dict]:
    """Memory-model records, one per (shape, N, op, impl)."""
    os.environ.setdefault(settings.FUSED_EPILOGUE.name, "1")
    records = []
    for shape in resolve_shapes(shapes, N=N):
        for op in [s for s in ops.split(",") if s]:
            if op not in MEMORY_OPS:
                raise ValueError(f"unknown memory-model op {op!r}; known: {MEMORY_OPS}")
            problem = make_problem(op, shape, dtype, seq_len, group_size)
            for name, impl, reason in implementations(impls):
                rec = {"shape": shape.name, "N": shape.N, "H": shape.H, "V": shape.V, "op": op,
                       "impl": name, "dtype": dtype, "peak_extra_bytes": None}
                status = reason or (impl.status(op, torch.device("cuda")) if impl else "")
                if status and status.startswith("n/a"):
                    rec["status"] = status
                elif impl is not None and not reason:
                    if name in (ONE_PASS.name, ONE_PASS_PAIR.name) and op != "logprobs":
                        with environ(impl.env):
                            rec.update(one_pass_budget(problem))
                    try:
                        rec.update(trace_peak(impl, problem))
                        rec["status"] = "ok"
                    except Exception as e:  # noqa: BLE001 -- reported, never dropped
                        rec["status"] = _why(e)
                    if rec.get("plan_refusal"):
                        rec["status"] = (
                            f"refused: {settings.ONE_PASS_BYTES.name} = "
                            f"{rec['budget_bytes'] / 2**30:.2f} GiB cannot hold the dW state "
                            f"({rec['acc_bytes'] / 2**30:.2f} GiB) and 256-row chunks")
                else:
                    rec["status"] = status
                records.append(rec)
    return records


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:9.3f}"


def table(records) -> str:
    """Markdown table: peak extra GiB and the share of eager's, per row."""
    eager = {(r["shape"], r["N"], r["op"]): r["peak_extra_bytes"] for r in records
             if r["impl"] == "eager"}
    lines = ["| shape | N | op | impl | peak extra GiB | % of eager | status |",
             "|---|---:|---|---|---:|---:|---|"]
    for r in records:
        e = eager.get((r["shape"], r["N"], r["op"]))
        pct = (f"{100 * r['peak_extra_bytes'] / e:.2f}" if e and r["peak_extra_bytes"] is not None
               else "-")
        status = r.get("status", "")
        if r.get("plan_bytes") is not None:
            status += (f" (plan {r['plan_bytes'] / 2**30:.2f} GiB = {r['n_chunks']} chunk(s) of "
                       f"{r['chunk_rows']} rows + {r['acc_bytes'] / 2**30:.2f} GiB dW state; "
                       f"budget {r['budget_bytes'] / 2**30:.2f} GiB)")
        lines.append(f"| {r['shape']} | {r['N']} | {r['op']} | {r['impl']} | "
                     f"{_gib(r['peak_extra_bytes']).strip()} | {pct} | {status} |")
    return "\n".join(lines)


def _given(argv, flag) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(args, argv) -> int:
    """``python -m bench --memory-model``: bench's --shapes/--N/--ops/--impls/--dtype/--out."""
    records = run(args.shapes or DEFAULT_SHAPES, args.N or DEFAULT_N,
                  args.ops if _given(argv, "--ops") else ",".join(MEMORY_OPS),
                  args.impls if _given(argv, "--impls") else None, args.dtype.split(",")[0],
                  args.seq_len, args.group_size)
    md = table(records)
    print(md)
    out = write_table(args.out or "bench/results/memory-model", "memory", records,
                      "Memory model (meta device, allocation tracer)",
                      "peak extra = peak live bytes of forward + backward minus the inputs and, from their "
                      "allocation on, the gradients hidden.grad, weight.grad (bench/memory_model.py).", md)
    print(f"wrote {out / 'memory.json'} and {out / 'memory.md'}")
    return 0
