"""bench/roofline.py: the model follows the code's tiling, and docs/kernels.md shows its output."""
import pathlib

from bench import roofline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_table_is_the_models_output():
    doc = (ROOT / "docs" / "kernels.md").read_text()
    for line in (roofline.table(8192, list(roofline.SHAPES)).splitlines()
                 + roofline.one_pass_table(8192, list(roofline.SHAPES)).splitlines()):
        assert line in doc, f"docs/kernels.md is stale (rerun python -m bench.roofline): {line}"


def test_model_counts():
    N, H, V = 8192, 4096, 128256
    c = {x.path.split(" (")[0]: x for x in roofline.costs(N, H, V)}
    atomic, gemm = c["backward, atomic kernel"], c["backward, GEMM"]
    assert atomic.flops == gemm.flops == 6 * N * H * V
    assert gemm.atomics == 0 and atomic.atomics > 2.5e11          # ~270 GB of fp32 reductions
    assert atomic.bound()[0] == "atomics" and gemm.bound()[0] == "tensor cores"
    assert c["forward, fused kernel"].l2 > 1.3e11                 # ~134 GB of re-read tiles


def test_one_pass_model():
    """The one-pass path as built: 6NHV flops in three GEMMs, the float32 logits streamed four
    times (cuBLAS write, two row-kernel reads, the dz write in half the bytes), W read twice per chunk."""
    from upg_kernels.kernels import one_pass
    import torch
    N, H, V = 8192, 4096, 128256
    ks = roofline.one_pass_kernels(N, H, V)
    assert sum(k.flops for k in ks) == 6 * N * H * V
    assert sum(k.hbm for k in ks if "row kernel" in k.path) == N * V * (4 + 4 + 2)
    pl = one_pass.plan(N, H, V, torch.bfloat16, gpu=True)
    c = {x.path.split(" (")[0]: x for x in roofline.costs(N, H, V)}["one pass, fwd+bwd"]
    assert c.flops == 6 * N * H * V and c.hbm == sum(k.hbm for k in ks)
    assert f"{pl.n_chunks} chunk(s)" in [x.path for x in roofline.costs(N, H, V) if x.path.startswith("one pass")][0]
