"""GPU benchmark set (pytest-benchmark, marked ``gpu``; skipped without CUDA).

Run on a GPU machine: ``pytest -m gpu bench/test_bench_gpu.py`` (``bench/gpu_run.sh`` does). Each case
times one fwd+bwd call (synchronized, so the wall clock pytest-benchmark reads covers the GPU work) at
a mid-size shape and checks the result against the float64 reference; a memory test checks that our
fused path never holds anything near the N x V logits; a CLI test runs ``python -m bench`` end to end.
The authoritative numbers come from ``python -m bench`` (CUDA events), not from these tests.
"""
import json

import pytest
import torch

from bench.impls import REGISTRY
from bench.measure import call, peak_memory
from bench.problems import make_inputs, make_problem, reference, rel_err
from bench.shapes import Shape

pytestmark = pytest.mark.gpu

SHAPE = Shape("mid", 2048, 32768, 4096)
IMPLS = ("ours", "ours-dropin", "eager", "liger", "cce")
TOL_BF16 = 2e-2


def _dev():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def problems():
    cache = {}

    def get(op):
        if op not in cache:
            p = make_problem(op, SHAPE, "bf16", seq_len=512, group_size=4)
            x = make_inputs(p, _dev(), seed=0)
            ref = reference(op, x)
            cache[op] = (p, x, ref)
        return cache[op]
    yield get
    cache.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("op", ["logprobs", "sft", "grpo", "hpt"])
@pytest.mark.parametrize("name", IMPLS)
def test_gpu_fwd_bwd(benchmark, problems, op, name):
    dev = _dev()
    impl = REGISTRY[name]()
    status = impl.status(op, dev)
    if status is not None:
        pytest.skip(status)
    p, x, ref = problems(op)
    impl.prepare(p, dev)

    def step():
        r = call(impl, op, x, "fwd+bwd")
        torch.cuda.synchronize()
        return r

    benchmark.group = f"{op}-bf16-H{SHAPE.H}-V{SHAPE.V}-N{SHAPE.N}"
    benchmark.extra_info.update(impl=name, detail=impl.detail)
    out, dh, dw = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=2)
    for got, key in ((out, "out"), (dh, "dhidden"), (dw, "dweight")):
        err = rel_err(got, ref[key])
        benchmark.extra_info[f"err_{key}"] = err
        assert err <= TOL_BF16, f"{name} {op}: {key} rel err {err:.2e}"


@pytest.mark.parametrize("op", ["sft", "grpo"])
def test_gpu_ours_never_holds_the_logits(op):
    """Peak memory of our fwd+bwd above the inputs stays under half the fp32 N x V logits
    (eager needs several times the logits)."""
    dev = _dev()
    shape = Shape("mem", 2048, 65536, 16384)
    p = make_problem(op, shape, "bf16", seq_len=1024, group_size=8)
    x = make_inputs(p, dev, seed=1)
    impl = REGISTRY["ours"]()
    if impl.status(op, dev) is not None:
        pytest.skip(impl.status(op, dev))
    impl.prepare(p, dev)
    call(impl, op, x, "fwd+bwd")  # warm-up (compile, autotune)
    peak = peak_memory(impl, op, x, "fwd+bwd", dev)
    logits_fp32 = shape.N * shape.V * 4
    assert peak < 0.5 * logits_fp32, f"peak {peak / 2**30:.2f} GiB vs fp32 logits {logits_fp32 / 2**30:.2f} GiB"


def test_gpu_cli_end_to_end(tmp_path):
    """``python -m bench`` on a small custom shape with every default implementation: no adapter errors."""
    from bench.cli import main
    rc = main(["--H", "1024", "--V", "16384", "--N", "2048", "--ops", "logprobs,sft,grpo,hpt",
               "--impls", "ours,eager,liger,cce", "--iters", "3", "--warmup", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    bad = [(r["op"], r["impl"], r["status"]) for r in data["rows"]
           if not (r["status"] == "ok" or r["status"].startswith(("n/a", "missing")))]
    assert not bad, bad
    assert data["meta"]["matmul_peak"]["tflops"] > 0
    assert all(r["mem_peak_bytes"] is not None for r in data["rows"] if r["status"] == "ok")
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
