"""The backend table (upg_kernels/kernels/backends.py): one owner of the backend names and abilities,
read by backend selection, the loss path, the bench adapters and the memory model; no import cycles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upg_kernels._backend import BACKENDS as CHOICES
from upg_kernels._backend import resolve_backend
from upg_kernels.kernels import backends as B
from upg_kernels.kernels import get_backend

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "upg_kernels" / "kernels"


def test_names_have_one_owner():
    assert CHOICES == ("auto",) + tuple(B.BACKENDS) == B.BACKEND_CHOICES
    assert B.BACKEND_NAMES == tuple(B.BACKENDS)
    for name, row in B.BACKENDS.items():
        assert row.name == name and get_backend(name) is row
        assert row.forwards and all(f in B.FORWARD_PATHS for f in row.forwards)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        get_backend("nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("nope", torch.device("cpu"))


def test_every_function_the_table_names_exists():
    pytest.importorskip("triton")
    for row in B.BACKENDS.values():
        refs = [B.FORWARD_PATHS[f].fn for f in row.forwards] + [row.bwd]
        refs += [row.partials] if row.partials else []
        for ref in refs:
            assert callable(B.load(ref)), ref


def test_auto_reads_the_table(monkeypatch):
    monkeypatch.delenv("UPG_KERNELS_BACKEND", raising=False)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", meta) == "torch"
    assert B.auto_backend(torch.device("cuda"), torch.float64) == "torch"     # no float64 Triton
    if B.triton_available():
        assert B.auto_backend(torch.device("cuda"), torch.bfloat16) == "triton"
    monkeypatch.setattr(B, "triton_available", lambda: False)
    assert B.auto_backend(torch.device("cuda"), torch.bfloat16) == "torch"


def test_forward_path_choice(monkeypatch):
    row = get_backend("triton")
    monkeypatch.delenv("UPG_KERNELS_TRITON_FORWARD", raising=False)
    assert row.forward_path().name == "fused"
    monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", "gemm")
    assert row.forward_path().name == "gemm"
    assert get_backend("torch").forward_path().name == "chunked"     # one path: no choice
    monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", "cublas")
    with pytest.raises(ValueError, match="UPG_KERNELS_TRITON_FORWARD must be one of"):
        row.forward_path()
    with pytest.raises(ValueError, match="has no forward path 'gemm'"):
        get_backend("torch").forward_path("gemm")


def test_forward_dispatches_by_path(monkeypatch):
    pytest.importorskip("triton")
    from upg_kernels.kernels import triton_gemm_fwd, triton_logprobs_fwd
    calls = []
    monkeypatch.setattr(triton_gemm_fwd, "forward", lambda *a: calls.append("gemm"))
    monkeypatch.setattr(triton_logprobs_fwd, "forward", lambda *a: calls.append("fused"))
    for env in ("gemm", "fused"):
        monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", env)
        get_backend("triton_atomic").forward(None, None, None, None, None)
    assert calls == ["gemm", "fused"]


def test_no_name_prefix_checks_and_no_cycles():
    """Capability comes from the rows, never from ``name.startswith("triton")``; the kernel modules
    import the contract, never the table or the package (which imports the table), so the table's
    lazy imports cannot form a cycle."""
    for path in list((ROOT / "upg_kernels").rglob("*.py")) + list((ROOT / "bench").glob("*.py")):
        assert 'startswith("triton")' not in path.read_text(), path
    consumers = ("select.py", "paths.py")      # read the table; the table never imports them
    table_src = (KERNELS / "backends.py").read_text()
    for name in consumers:
        assert f"{name[:-3]}:" not in table_src and f"import {name[:-3]}" not in table_src, name
    for path in KERNELS.glob("*.py"):
        if path.name in ("__init__.py", "backends.py") + consumers:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module != "backends", f"{path.name} imports the backend table"
                if node.module is None:      # ``from . import x``: only submodules
                    for a in node.names:
                        assert (KERNELS / f"{a.name}.py").exists(), \
                            f"{path.name} imports {a.name!r} from the package, not from its module"


@pytest.mark.parametrize("module", ["torch_chunked", "gemm_backward", "triton_gemm_fwd",
                                    "triton_logprobs_fwd", "triton_logprobs_bwd", "contract"])
def test_each_module_imports_first(module):
    """Each module imports alone in a fresh interpreter (an import cycle fails here)."""
    if module not in ("torch_chunked", "contract"):
        pytest.importorskip("triton")
    subprocess.run([sys.executable, "-c", f"import upg_kernels.kernels.{module}"], check=True,
                   cwd=ROOT)


def test_bench_and_memory_model_read_the_table():
    from bench import impls, memory_model
    paths = {p.backend for p in memory_model.OURS_PATHS}
    assert paths == set(B.BACKENDS)
    assert [p.name for p in memory_model.OURS_PATHS if p.default] == [
        f"ours-{b.name}" for b in B.BACKENDS.values() if "cuda" in b.auto_on]
    for b in B.BACKENDS.values():
        if "cuda" not in b.auto_on:
            assert impls.REGISTRY[f"ours-{b.short}"].backend == b.name


def test_fused_epilogue_only_where_the_row_says(monkeypatch):
    """The loss takes the fused epilogue by the row's ``fused_epilogue``, not by the name."""
    from upg_kernels import LossConfig, unified_policy_loss
    from upg_kernels.losses import unified
    seen = []
    real = unified.fused_policy_epilogue
    monkeypatch.setattr(unified, "fused_policy_epilogue", lambda *a, **k: seen.append(1) or real(*a, **k))
    h = torch.randn(2, 3, 8)
    w = torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 3))
    kw = dict(config=LossConfig.preset("grpo"), advantages=torch.tensor([1.0, -1.0]))
    unified_policy_loss(h, w, t, backend="torch", **kw)
    assert not seen and not get_backend("torch").fused_epilogue
    if B.triton_available():
        unified_policy_loss(h, w, t, backend="triton", **kw)
        assert seen
