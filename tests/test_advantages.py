"""group_advantages: every mode against a plain-Python reference, exact zeros, errors."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upg_kernels import group_advantages
from upg_kernels.losses.reference import group_advantages_reference

MODES = ["mean_std", "mean", "rloo", "batch_std"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_reference_group_size(mode):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    r[4:8] = 0.25                                   # one equal-reward group
    a = group_advantages(r, group_size=4, mode=mode)
    ref = torch.tensor(group_advantages_reference(r.tolist(), group_size=4, mode=mode), dtype=torch.float64)
    assert torch.allclose(a, ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(a[4:8], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_reference_group_ids(mode):
    r = torch.tensor([1.0, 0.0, 3.0, 1.0, 1.0, 2.0, 0.5, 0.5])
    ids = torch.tensor([5, 2, 5, 2, 9, 5, 7, 7])   # non-contiguous, unequal sizes; group 7 equal
    if mode == "rloo":
        ids = torch.tensor([5, 2, 5, 2, 2, 5, 7, 7])
    a = group_advantages(r, group_ids=ids, mode=mode)
    ref = torch.tensor(group_advantages_reference(r.tolist(), group_ids=ids.tolist(), mode=mode))
    assert a.dtype == torch.float32
    assert torch.allclose(a, ref, rtol=1e-6, atol=1e-7)
    assert a[6] == 0 and a[7] == 0


def test_formulas():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(group_advantages(r, group_size=4), (r - 0.5) / (std + 1e-4))
    assert torch.allclose(group_advantages(r, group_size=4, mode="mean"), r - 0.5)
    assert torch.allclose(group_advantages(r, group_size=4, mode="rloo"), 4 / 3 * (r - 0.5))
    assert torch.allclose(group_advantages(r, group_size=2, mode="batch_std"),
                          (r - 0.5) / (r.std() + 1e-4))
    assert torch.allclose(group_advantages(r, group_size=4, eps=0.0), (r - 0.5) / std)


def test_equal_rewards_exactly_zero_never_nan():
    # values whose float mean is not exactly the value itself
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    for mode in MODES:
        a = group_advantages(r, group_size=3, mode=mode, eps=0.0)
        assert torch.equal(a, torch.zeros(6, dtype=torch.float64)), mode
    a = group_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=1)   # groups of one
    assert torch.equal(a, torch.zeros(3))


def test_integer_and_bool_rewards():
    a = group_advantages(torch.tensor([1, 0, 1, 1]), group_size=2, mode="mean")
    assert a.dtype == torch.float32 and a.tolist() == [0.5, -0.5, 0.0, 0.0]
    a = group_advantages(torch.tensor([True, False]), group_size=2, mode="mean")
    assert a.tolist() == [0.5, -0.5]


@pytest.mark.parametrize("kw,match", [
    (dict(), "needs group_size or group_ids"),
    (dict(group_size=4), "group_size=4 does not divide the batch of 6"),
    (dict(group_size=0), "group_size must be a positive int"),
    (dict(group_size=2, group_ids=torch.zeros(6, dtype=torch.long)), "not both"),
    (dict(group_ids=torch.zeros(5, dtype=torch.long)), r"group_ids must have shape \[B=6\]"),
    (dict(group_ids=torch.zeros(6)), "group_ids must hold integer labels"),
    (dict(group_size=2, mode="median"), "mode must be one of"),
    (dict(group_size=1, mode="rloo"), "rloo.*at least 2"),
    (dict(group_size=2, eps=-1.0), "eps must be"),
])
def test_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.arange(6.0), **kw)


def test_rewards_shape_and_nan_policy():
    with pytest.raises(ValueError, match="rewards must have shape"):
        group_advantages(torch.zeros(2, 3), group_size=3)
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    with pytest.raises(ValueError, match="non-finite value nan at row 1"):
        group_advantages(r, group_size=2)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("inf")]), group_size=2)


def test_empty_and_list_input():
    assert group_advantages(torch.zeros(0), group_size=2).shape == (0,)
    assert group_advantages([1.0, 0.0], group_size=2, mode="mean").tolist() == [0.5, -0.5]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=6), st.integers(1, 4), st.sampled_from(MODES))
def test_property_group_sums_and_signs(vals, ngroups, mode):
    G = len(vals)
    r = torch.tensor(vals * ngroups, dtype=torch.float64)
    r = r + torch.arange(ngroups, dtype=torch.float64).repeat_interleave(G) * 0  # same rewards per group
    a = group_advantages(r, group_size=G, mode=mode)
    assert torch.isfinite(a).all()
    per = a.reshape(ngroups, G)
    assert torch.allclose(per.sum(1), torch.zeros(ngroups, dtype=torch.float64), atol=1e-9)
    centered = r.reshape(ngroups, G) - r.reshape(ngroups, G).mean(1, keepdim=True)
    assert bool(((per > 0) == (centered > 1e-12)).all())
    if len(set(vals)) == 1:
        assert torch.equal(a, torch.zeros_like(a))
