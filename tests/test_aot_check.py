"""The ahead-of-time compile check: the registry matches the kernels and the launchers, and a couple of
variants compile for sm_90 with the installed triton (a subprocess, interpreter off). The full check
is ``bash scripts/aot_check.sh`` (run by .ci/run)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upg_kernels.kernels import TRITON_KERNEL_MODULES

ROOT = Path(__file__).resolve().parents[1]


def _variants(module):
    """The registry as aot_check sees it (interpreter off: the GPU block configs)."""
    from bench.memory_model import gpu_planning
    with gpu_planning():
        return importlib.import_module(f"upg_kernels.kernels.{module}").aot_variants()


@pytest.mark.parametrize("module", TRITON_KERNEL_MODULES)
def test_registry_matches_kernel_signatures(module):
    vs = _variants(module)
    assert vs, f"{module}.aot_variants() is empty"
    names = set()
    for v in vs:
        sig = v.signature()              # raises when an argument is untyped or unknown
        assert list(sig) == list(v.kernel.arg_names)
        assert all(t == "constexpr" or t.startswith(("*", "i", "fp")) for t in sig.values())
        assert v.num_warps in (1, 2, 4, 8, 16) and v.num_stages >= 1
        names.add((v.name, v.variant))
    assert len(names) == len(vs), "two variants share a name"


def _launched_constexprs(monkeypatch, module, run):
    """The constexpr kwargs the launcher passes, captured on the meta device (no launch)."""
    from bench.memory_model import AllocTracer, gpu_planning
    mod = importlib.import_module(f"upg_kernels.kernels.{module}")
    seen = []

    def spy(kernel, grid, *args, **kw):
        seen.append({k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")})
    monkeypatch.setattr(mod, "launch", spy)
    with gpu_planning(), AllocTracer():    # the tracer runs the custom ops' host code on meta
        run()
    assert seen, f"{module}: nothing launched"
    return seen


FIXED = ("PREC", "UPCAST", "DH_DIRECT", "EVEN_H", "BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP_N")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,bias,softcap", [(256, False, None), (200, True, 30.0)])
@pytest.mark.parametrize("module,backend,full", [("triton_logprobs_fwd", "triton", True),
                                                 ("triton_logprobs_bwd", "triton_atomic", False),
                                                 ("triton_dz", "triton", False)])
def test_registry_covers_what_the_launchers_request(monkeypatch, dtype, H, bias, softcap, module,
                                                    backend, full):
    """What the launchers request at these settings is registered: exactly (the forward registers
    the full product), or for a covering set: a variant with the launch's block config, precision
    and H flags, and each of its flags' values registered with that config."""
    from upg_kernels import token_logprobs
    N, V = 64, 1000
    h = torch.empty(N, H, dtype=dtype, device="meta", requires_grad=True)
    w = torch.empty(V, H, dtype=dtype, device="meta", requires_grad=True)
    b = torch.empty(V, dtype=dtype, device="meta", requires_grad=True) if bias else None
    t = torch.empty(N, dtype=torch.int64, device="meta")

    def run():
        lp, ent = token_logprobs(h, w, t, bias=b, softcap=softcap, return_entropy=True,
                                 backend=backend)
        (lp.sum() + ent.sum()).backward()

    launched = _launched_constexprs(monkeypatch, module, run)
    registered = [v.constexprs for v in _variants(module)]
    for cx in launched:
        if full:
            assert cx in registered, f"{module} launches an unregistered variant {cx}"
            continue
        fixed = [k for k in FIXED if k in cx]
        same = [r for r in registered if all(r[k] == cx[k] for k in fixed)]
        assert same, f"{module}: the launch config {[cx[k] for k in fixed]} is not registered"
        for k, v in cx.items():
            assert any(r[k] == v for r in same), f"{module}: flag {k}={v} never registered"


def _aot(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "upg_kernels.aot_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_aot_compiles_two_variants_for_sm90(tmp_path):
    out = tmp_path / "aot.json"
    r = _aot("--arch", "sm_90", "--only", "_fwd_kernel,_epilogue_kernel", "--variant", "^(bf16|grpo)$",
             "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert {x["kernel"] for x in res} == {"_fwd_kernel", "_epilogue_kernel"}
    for x in res:
        assert x["error"] == "" and x["arch"] == "sm_90"
        assert 0 < x["registers"] <= 255 and x["spill_stores"] == 0 and x["shared"] >= 0
    assert "_fwd_kernel" in r.stdout and "spillST" in r.stdout


def test_aot_reports_failures_and_bad_usage(tmp_path):
    r = _aot("--arch", "sm_9")
    assert r.returncode == 2 and "--arch" in r.stderr
    r = _aot("--only", "no_such_kernel")
    assert r.returncode == 2 and "matches no registered kernel" in r.stderr


def _captured_specs(monkeypatch, run):
    """``{spec}`` of every launch of every registered kernel module during ``run`` on meta, with the
    integer / pointer specialization triton's JIT would apply to those real values."""
    from bench.memory_model import AllocTracer, gpu_planning
    from upg_kernels.kernels.aot import spec_of_launch
    seen = set()
    for module in TRITON_KERNEL_MODULES:
        mod = importlib.import_module(f"upg_kernels.kernels.{module}")
        if hasattr(mod, "launch"):
            monkeypatch.setattr(mod, "launch",
                                lambda k, grid, *a, **kw: seen.add(spec_of_launch(k, a, kw)))
    with gpu_planning(), AllocTracer():
        run()
    return seen


def test_int_specialization_is_the_jits():
    """aot.int_specialization follows triton's own launch-time rule (where this triton exposes it)."""
    from upg_kernels.kernels.aot import int_specialization
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend
    for v in (0, 1, 2, 15, 16, 17, 48, 8192, 8191, 128256, 2**31 + 16):
        ty, key = native(BaseBackend, v, False, True, True)
        assert int_specialization(v) == ("1" if ty == "constexpr" else key), v


@pytest.mark.parametrize("shape,N,dz_tile", [("llama3-8b", 8192, None), ("llama3-8b", 8191, None),
                                             ("gemma2-2b", 8192, None), ("qwen2.5-0.5b", 32768, None),
                                             ("llama3-8b", 8191, "128x64")])
def test_registry_holds_the_real_specializations_at_design_shapes(monkeypatch, shape, N, dz_tile):
    """What the plans launch at the yardstick shapes (bf16, no bias; both Triton backends and the
    GEMM-tiled forward), with the JIT's specialization of the REAL integer values (group sizes, slab
    bounds, row counts; N - 1 gives the tails), is registered (up to the feature flags, see
    _without_flags): the compile check builds what the GPU builds."""
    from bench.shapes import NAMED
    from upg_kernels import token_logprobs, unified_policy_loss
    if dz_tile:
        monkeypatch.setenv("UPG_KERNELS_TRITON_DZ_CONFIG", dz_tile)
    H, V, _ = NAMED[shape]

    def run():
        for backend, fwd in (("triton", "fused"), ("triton_atomic", "fused"), ("triton", "gemm")):
            monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", fwd)
            h = torch.empty(N, H, dtype=torch.bfloat16, device="meta", requires_grad=True)
            w = torch.empty(V, H, dtype=torch.bfloat16, device="meta", requires_grad=True)
            t = torch.empty(N, dtype=torch.int64, device="meta")
            lp, ent = token_logprobs(h, w, t, return_entropy=True, backend=backend)
            (lp.sum() + ent.sum()).backward()
        monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", "fused")
        adv = torch.empty(N, device="meta")              # the GRPO loss with the fused epilogue
        old = torch.empty(N, device="meta")
        unified_policy_loss(h, w, t, config="grpo", advantages=adv, old_logprobs=old,
                            backend="triton").loss.backward()

    launched = {_without_flags(s) for s in _captured_specs(monkeypatch, run)}
    registered = {_without_flags(v.spec()) for m in TRITON_KERNEL_MODULES for v in _variants(m)}
    kernels = {s[0] for s in launched}
    assert {"_fwd_kernel", "_dz_kernel", "_bwd_kernel", "_stats_kernel", "_epilogue_kernel"} <= kernels, kernels
    missing = [s for s in launched if s not in registered]
    assert not missing, f"launched but not compiled by the check: {missing[:2]}"


def _without_flags(spec):
    """A spec without the feature flags (HAS_*, NEED_*, FILTER): on meta the host cannot see that a
    gradient is all zero, so it launches the worst-case flags; the flags are a covering set checked
    by test_registry_covers_what_the_launchers_request. Everything else must match exactly: types,
    block config, precision, EVEN_H, the divisibility / equal-to-1 of every integer and pointer."""
    name, types, cx, div, one, warps, stages = spec
    cx = tuple((k, v) for k, v in cx if not k.startswith(("HAS_", "NEED_")) and k != "FILTER")
    return name, types, cx, div, one, warps, stages
