"""The fused epilogue's parameters have one list (``EpilogueParams``' fields): the config fields, the
custom op's lists, the kernel's arguments, the launcher and the compile check's types derive from it
and stay in sync."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from upg_kernels import LossConfig
from upg_kernels.kernels.epilogue_codes import (MODE_FIELDS, SCALAR_FIELDS, STABILIZATION_CODES,
                                                EpilogueParams)
from upg_kernels.losses.config import PRESETS
from upg_kernels.losses.fused import fused_supported

CONFIG_FIELDS = {f.name for f in dataclasses.fields(LossConfig)}


def _kernel():
    pytest.importorskip("triton")
    from upg_kernels.kernels import triton_epilogue
    return triton_epilogue


def test_fields_come_from_the_config():
    for f in dataclasses.fields(EpilogueParams):
        assert f.name in CONFIG_FIELDS or f.metadata.get("from_config"), \
            f"EpilogueParams.{f.name} is neither a LossConfig field nor derived from one"
    assert set(MODE_FIELDS) | set(SCALAR_FIELDS) == {f.name for f in dataclasses.fields(EpilogueParams)}


@pytest.mark.parametrize("preset", [n for n in PRESETS if fused_supported(LossConfig.preset(n))])
def test_lists_round_trip(preset):
    cfg = LossConfig.preset(preset, kl_coef=0.1, delta=2.0)
    prm = EpilogueParams.from_config(cfg)
    modes, scalars = prm.to_lists()
    assert len(modes) == len(MODE_FIELDS) and len(scalars) == len(SCALAR_FIELDS)
    assert EpilogueParams.from_lists(modes, scalars) == prm
    assert prm.kl_coef == 0.1 and prm.delta == 2.0 and prm.stabilization == STABILIZATION_CODES[cfg.stabilization]
    with pytest.raises(ValueError, match="expected"):
        EpilogueParams.from_lists(modes, scalars[:-1])


def test_each_config_scalar_reaches_its_kernel_argument():
    """Changing one config field changes exactly the kernel argument of the same name (on a preset with
    demonstrations, where demo_coef / hpt_gamma are accepted)."""
    base = LossConfig.preset("hpt")
    ref = EpilogueParams.from_config(base).kernel_scalars()
    assert set(ref) == set(SCALAR_FIELDS)
    for f in dataclasses.fields(EpilogueParams):
        if f.metadata["kind"] != "scalar" or f.metadata["from_config"]:
            continue
        old = getattr(base, f.name)
        new = old * 0.5 if old else 0.125
        got = EpilogueParams.from_config(dataclasses.replace(base, **{f.name: new})).kernel_scalars()
        assert got == {**ref, f.name: new}, f.name
    got = EpilogueParams.from_config(dataclasses.replace(base, rollout_is_cap=3.0)).kernel_scalars()
    assert got["log_cap"] == pytest.approx(1.0986122886681098)


def test_kernel_signature_and_compile_types_match_the_fields():
    te = _kernel()
    fn = te._epilogue_kernel
    fn = getattr(fn, "fn", fn)
    params = inspect.signature(fn).parameters
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    runtime = [n for n in params if n not in constexprs]
    fp32_args = [n for n in runtime if not n.endswith("_ptr") and n not in ("M", "n_splits")]
    assert fp32_args == list(SCALAR_FIELDS), "kernel scalars and EpilogueParams' scalar fields differ"
    prm = EpilogueParams()
    assert set(prm.mode_constexprs()) <= constexprs
    cx = te.epilogue_constexprs(prm, has_old=True, has_ref=False, has_rol=False, has_isr=False)
    assert set(cx) == constexprs
    for v in te.aot_variants():
        assert set(v.types) == set(runtime), v.name


def test_the_launcher_passes_every_scalar_by_name(monkeypatch):
    te = _kernel()
    seen = {}
    real = te._epilogue_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.update(kw)
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(te, "_epilogue_kernel", Spy())
    prm = EpilogueParams(stabilization=1, reference=1, eps_low=0.3, eps_high=0.25, kl_coef=0.07,
                         demo_coef=0.5, rl_coef=2.0)
    M = N = 5
    part = torch.zeros(4, 1, M)
    part[1] = 1.0
    rows = torch.arange(M)
    z = torch.zeros(N)
    te.epilogue(part, rows, N, old=z, ref=None, rol=None, adv=torch.ones(N), isr=None, w=torch.ones(N),
                code=torch.ones(N, dtype=torch.int8), params=prm)
    assert {k: seen[k] for k in SCALAR_FIELDS} == prm.kernel_scalars()
