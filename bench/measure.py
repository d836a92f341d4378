"""Timing, memory, the matmul ceiling and the FLOP model.

Timing: on CUDA, a pair of CUDA events around each timed iteration (after warm-up), inputs rotating
over several input sets; on CPU, ``time.perf_counter``, and the impls of a row are timed
*interleaved* (:func:`time_interleaved`: one call of each impl per round, the order alternating), so
that a change of load on a shared machine hits every impl alike; each round's ratio to the first impl
(eager) is reported beside the medians. Memory (CUDA only): peak allocated during one
call above what was allocated before it (the input sets and anything else already resident), read with
``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``. On CPU (no allocator statistics) the
same call runs once under :class:`bench.memtrace.AllocTracer`: the peak of the live bytes of the
tensors torch ops create during the call (exact for op outputs; scratch memory inside one aten kernel
is not seen), null for torch.compile (inductor's buffers are not op outputs).
"""
from __future__ import annotations

import gc
import math
import time

import torch

from .impls import Impl, objective
from .problems import Inputs, Problem

MODES = ("fwd", "bwd", "fwd+bwd")

FLOP_MODEL = (
    "useful FLOPs: fwd 2*N*H*V (the logits GEMM), bwd 4*N*H*V (dhidden and dweight GEMMs), "
    "fwd+bwd 6*N*H*V, the same for every implementation (a fused kernel's logits recompute in the "
    "backward, +2*N*H*V, is not counted); N counts every token, masked ones included")


def useful_flops(mode: str, N: int, H: int, V: int) -> float:
    return {"fwd": 2.0, "bwd": 4.0, "fwd+bwd": 6.0}[mode] * N * H * V


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(times_ms: list[float]) -> dict:
    return {
        "median_ms": percentile(times_ms, 0.5),
        "p10_ms": percentile(times_ms, 0.1),
        "p90_ms": percentile(times_ms, 0.9),
        "q25_ms": percentile(times_ms, 0.25),
        "q75_ms": percentile(times_ms, 0.75),
        "min_ms": min(times_ms) if times_ms else float("nan"),
        "mean_ms": sum(times_ms) / len(times_ms) if times_ms else float("nan"),
    }


# ----------------------------------------------------------------------------- matmul ceiling
def matmul_peak(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None,
                iters: int = 10, warmup: int = 3) -> dict:
    """Time an n x n x n matmul on random data (median of ``iters``): the arithmetic ceiling of this
    run. CUDA: bf16, n = 8192. CPU: fp32, n = 1024 (a CPU reference point, not a GPU figure)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device=device)
    g.manual_seed(1234)
    a = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(dtype)
    times = _time_loop(lambda i: i, lambda i: a @ b, device, warmup, iters)
    med = percentile(times, 0.5)
    del a, b
    free(device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": med,
            "tflops": 2.0 * n ** 3 / (med * 1e-3) / 1e12, "times_ms": times}


# ----------------------------------------------------------------------------- one implementation call
def _grads(op: str, out: torch.Tensor, x: Inputs):
    return torch.autograd.grad(objective(op, out, x), [x.hidden, x.weight])


def call(impl: Impl, op: str, x: Inputs, mode: str):
    """One call in ``mode``: ``fwd`` returns the output; ``bwd``/``fwd+bwd`` also the gradients."""
    out = impl.forward(op, x)
    if mode == "fwd":
        return (out,)
    return (out, *_grads(op, out, x))


def _time_loop(prep, step, device, warmup: int, iters: int) -> list[float]:
    """Run ``prep(i)`` untimed, then ``step(prep(i))`` timed; ``warmup`` untimed rounds first."""
    for i in range(warmup):
        step(prep(i))
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        pairs, keep = [], None
        for i in range(iters):
            r = prep(i)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            keep = step(r)
            e.record()
            pairs.append((s, e))
            keep = None  # noqa: F841  (free the outputs; the allocator reuses them in stream order)
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        for i in range(iters):
            r = prep(i)
            t0 = time.perf_counter()
            keep = step(r)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e3)
            del keep
    return times


def time_impl(impl: Impl, op: str, sets: list[Inputs], mode: str, device: torch.device, *,
              warmup: int, min_iters: int, max_iters: int, budget_s: float) -> dict:
    """Warm up, estimate one call, then time enough iterations to fill ``budget_s`` (between
    ``min_iters`` and ``max_iters``); inputs rotate over ``sets``."""
    K = len(sets)

    if mode == "bwd":
        def prep(i):
            x = sets[i % K]
            return (x, impl.forward(op, x))

        def step(r):
            x, out = r
            return _grads(op, out, x)
    else:
        def prep(i):
            return i

        def step(i):
            return call(impl, op, sets[i % K], mode)

    est = _time_loop(prep, step, device, warmup, 1)[0]
    iters = int(max(min_iters, min(max_iters, math.ceil(budget_s * 1e3 / max(est, 1e-3)))))
    times = _time_loop(prep, step, device, 0, iters)
    return {"iters": iters, "warmup": warmup + 1, "rotating_sets": K, "times_ms": times, **stats(times)}


def time_interleaved(impls: list[Impl], op: str, sets: list[Inputs], mode: str, device: torch.device,
                     *, warmup: int, min_iters: int, max_iters: int, budget_s: float) -> dict:
    """Per impl name, :func:`time_impl`'s dict, measured in rounds: each round times one call of
    every impl (forward order on even rounds, reverse on odd ones), ``min_iters`` rounds at least,
    then until ``budget_s`` per impl or ``max_iters``. An impl that raises gets ``{"error": e}``.
    With more than one impl, each entry also has ``pair_ratios``: its time over the first impl's in
    the same round, per round."""
    K = len(sets)
    live, out = [], {}
    for impl in impls:
        try:
            for i in range(warmup):
                call(impl, op, sets[i % K], mode)
            live.append(impl)
        except Exception as e:      # noqa: BLE001 (reported per row by the caller)
            out[impl.name] = {"error": e}
    times = {impl.name: [] for impl in live}
    spent = 0.0
    r = 0
    while live and r < max_iters and (r < min_iters or spent / len(live) < budget_s * 1e3):
        order = live if r % 2 == 0 else live[::-1]
        for impl in order:
            sync(device)
            t0 = time.perf_counter()
            keep = call(impl, op, sets[r % K], mode)
            sync(device)
            dt = (time.perf_counter() - t0) * 1e3
            del keep
            times[impl.name].append(dt)
            spent += dt
        r += 1
    first = times[live[0].name] if live else []
    for impl in live:
        t = times[impl.name]
        out[impl.name] = {"iters": len(t), "warmup": warmup, "rotating_sets": K, "times_ms": t,
                          "timing": "interleaved", **stats(t)}
        if len(live) > 1:
            out[impl.name]["pair_ratios"] = [a / b for a, b in zip(t, first)]
    return out


def peak_memory(impl: Impl, op: str, x: Inputs, mode: str, device: torch.device) -> int | None:
    """Peak bytes allocated during one ``mode`` call above what was allocated just before it
    (inputs, and for ``bwd`` the forward's saved tensors, excluded from the base: the forward runs
    inside the measured region). The gradients it returns are counted. Off CUDA: traced (module
    docstring); None where the trace fails."""
    if device.type != "cuda":
        return _traced_peak(impl, op, x, mode)
    free(device)
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    r = call(impl, op, x, "fwd" if mode == "fwd" else "fwd+bwd")
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del r
    free(device)
    return int(peak)


def _traced_peak(impl: Impl, op: str, x: Inputs, mode: str) -> int | None:
    from .memtrace import AllocTracer
    if impl.name == "compile":      # inductor's buffers are not op outputs the tracer sees
        return None
    gc.collect()
    try:
        with AllocTracer() as t:
            r = call(impl, op, x, "fwd" if mode == "fwd" else "fwd+bwd")
            del r
    except Exception:      # a graph the tracer cannot follow (torch.compile): not measured
        return None
    return int(t.peak)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
