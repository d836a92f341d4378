"""CPU smoke benchmarks (pytest-benchmark): every available implementation at a tiny shape.

Run: ``pytest bench/test_bench_cpu.py`` (a few seconds; ``--benchmark-disable`` runs each once).
The timings are smoke numbers, not performance claims. Each case also checks its result against the
float64 reference, so a broken adapter fails here before it reaches a GPU run.
"""
import pytest
import torch

from bench.impls import REGISTRY, objective
from bench.measure import call
from bench.problems import make_inputs, make_problem, reference, rel_err
from bench.shapes import Shape

CPU = torch.device("cpu")
SHAPE = Shape("tiny", 64, 1000, 256)
CASES = [(op, name, "bf16") for op in ("logprobs", "sft", "grpo", "hpt")
         for name in ("ours", "ours-torch", "ours-tlp", "ours-dropin", "eager", "liger")]
CASES += [(op, name, "fp32") for op in ("logprobs", "sft", "grpo", "hpt") for name in ("ours", "eager")]
# combinations that do not exist (e.g. Liger has no per-token log-prob op) are not cases at all
CASES = [c for c in CASES if not (REGISTRY[c[1]]().status(c[0], CPU) or "").startswith("n/a")]
TOL = {"bf16": 2e-2, "fp32": 1e-4}


@pytest.fixture(scope="module")
def problems():
    cache = {}

    def get(op, dtype):
        if (op, dtype) not in cache:
            p = make_problem(op, SHAPE, dtype, seq_len=32, group_size=4)
            x = make_inputs(p, CPU, seed=0)
            cache[(op, dtype)] = (p, x, reference(op, x))
        return cache[(op, dtype)]
    return get


@pytest.mark.parametrize("op,name,dtype", CASES)
def test_cpu_fwd_bwd(benchmark, problems, op, name, dtype):
    impl = REGISTRY[name]()
    status = impl.status(op, CPU)
    if status is not None:   # a peer that is not installed (the dev extra installs them all)
        pytest.skip(status)
    p, x, ref = problems(op, dtype)
    impl.prepare(p, CPU)
    benchmark.group = f"{op}-{dtype}"
    benchmark.extra_info.update(impl=name, detail=impl.detail, N=p.N, H=SHAPE.H, V=SHAPE.V)
    out, dh, dw = benchmark.pedantic(call, args=(impl, op, x, "fwd+bwd"), rounds=3, iterations=1,
                                     warmup_rounds=1)
    for got, key in ((out, "out"), (dh, "dhidden"), (dw, "dweight")):
        err = rel_err(got, ref[key])
        benchmark.extra_info[f"err_{key}"] = err
        assert err <= TOL[dtype], f"{name} {op} {dtype}: {key} rel err {err:.2e}"
    assert torch.isfinite(objective(op, out, x)).item()
