"""The loss inputs as one object (LossBatch), global totals (batch_totals: micro-batches and ranks add up
to the whole batch, every preset), whole groups, and the API's errors for bad arguments."""
import dataclasses

import pytest
import torch

import upg_kernels
from upg_kernels import LossBatch, LossConfig, UnifiedPolicyLoss, policy_loss_from_logprobs, unified_policy_loss
from upg_kernels.losses import PRESETS
from upg_kernels.losses.batch import FIELD_NAMES

from test_losses import make_case

ALL_PRESETS = sorted(PRESETS)


def _grads(out, *xs):
    return torch.autograd.grad(out.loss, xs)


# ----------------------------------------------------------------------------------------- A: LossBatch
def test_batch_object_equals_keyword_shorthand():
    cfg, hid, w, b, tgt, kw = make_case("hpt", dtype=torch.float64)
    h1, h2 = hid.clone().requires_grad_(True), hid.clone().requires_grad_(True)
    o1 = unified_policy_loss(h1, w, tgt, config=cfg, bias=b, backend="torch", **kw)
    o2 = unified_policy_loss(h2, w, tgt, config=cfg, bias=b, backend="torch", batch=LossBatch(**kw))
    # part in the batch, part as keywords
    rest = dict(kw)
    mask = rest.pop("loss_mask")
    o3 = UnifiedPolicyLoss(cfg, backend="torch")(hid, w, tgt, LossBatch(**rest), bias=b, loss_mask=mask)
    assert torch.equal(o1.loss, o2.loss) and torch.equal(o1.loss.detach(), o3.loss.detach())
    torch.testing.assert_close(_grads(o1, h1)[0], _grads(o2, h2)[0], rtol=0, atol=0)
    assert o1.metrics == o2.metrics
    lp = o1.logprobs.clone().requires_grad_(True)
    kw["loss_mask"] = kw["loss_mask"] & (tgt != -100)
    p1 = policy_loss_from_logprobs(lp, config=cfg, entropy=o1.entropy, batch=LossBatch(**kw))
    p2 = policy_loss_from_logprobs(lp, config=cfg, entropy=o1.entropy, **kw)
    assert torch.equal(p1.loss, p2.loss) and torch.isfinite(p1.loss)
    torch.testing.assert_close(p1.loss, o1.loss, rtol=1e-12, atol=1e-12)


def test_batch_field_errors():
    cfg, hid, w, b, tgt, kw = make_case("grpo")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['loss_msk'\]"):
        unified_policy_loss(hid, w, tgt, config=cfg, loss_msk=kw["loss_mask"], backend="torch")
    with pytest.raises(ValueError, match=r"\['loss_mask'\] given both in batch= and as keyword"):
        unified_policy_loss(hid, w, tgt, config=cfg, backend="torch", batch=LossBatch(**kw),
                            loss_mask=kw["loss_mask"])
    with pytest.raises(TypeError, match="must be a LossBatch"):
        policy_loss_from_logprobs(torch.zeros(6, 5), config=cfg, batch=dict(kw))


def test_batch_select_and_fields_have_one_owner():
    cfg, hid, w, b, tgt, kw = make_case("hpt")
    lb = LossBatch(**kw, num_items_in_batch=7)
    part = lb.select(slice(1, 3))
    assert part.is_demo.tolist() == kw["is_demo"][1:3].tolist()
    assert part.num_items_in_batch == 7 and part.loss_mask.shape == (2, 5)
    assert FIELD_NAMES == tuple(f.name for f in dataclasses.fields(LossBatch))
    assert "LossBatch" in upg_kernels.__all__ and "batch_totals" in upg_kernels.__all__


# ----------------------------------------------------------------------------------------- B: API errors
def _small(seed=0, B=4, T=3, H=8, V=11):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, generator=g, dtype=torch.float64),
            torch.randn(V, H, generator=g, dtype=torch.float64), torch.randint(0, V, (B, T), generator=g))


@pytest.mark.parametrize("name, value", [("loss_mask", torch.ones(4, 3, device="meta")),
                                         ("rewards", torch.ones(4, device="meta")),
                                         ("old_logprobs", torch.zeros(4, 3, device="meta"))])
def test_argument_on_another_device_is_named(name, value):
    h, w, t = _small()
    kw = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    kw[name] = value
    with pytest.raises(ValueError, match=rf"{name} is on meta but hidden .* is on cpu"):
        unified_policy_loss(h, w, t, config="grpo", backend="torch", **kw)
    lp = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{name} is on meta"):
        policy_loss_from_logprobs(lp, config="grpo", **kw)


@pytest.mark.parametrize("bad", [None, 1.5, "x", True])
def test_ignore_index_must_be_an_int(bad):
    h, w, t = _small()
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        unified_policy_loss(h, w, t, config="sft", backend="torch", ignore_index=bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        upg_kernels.token_logprobs(h, w, t, backend="torch", ignore_index=bad)


def test_temperature_as_0d_tensor_or_numpy_scalar_is_its_value():
    np = pytest.importorskip("numpy")
    h, w, t = _small()
    ref = unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=0.7).loss
    for temp in (torch.tensor(0.7, dtype=torch.float64), np.float32(0.7), np.float64(0.7), np.array(0.7)):
        got = unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=temp).loss
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
        lp = upg_kernels.token_logprobs(h, w, t, backend="torch", temperature=temp)
        torch.testing.assert_close(lp, upg_kernels.token_logprobs(h, w, t, backend="torch", temperature=0.7),
                                   rtol=1e-6, atol=1e-7)
    for bad, msg in ((torch.tensor([0.7]), "temperature must be a number or a 0-d real tensor"),
                     (np.array([0.7, 0.8]), "temperature must be a number"),
                     (torch.tensor(0.7, requires_grad=True), "temperature is a tensor that requires grad"),
                     ("0.7", "temperature must be a number")):
        with pytest.raises(TypeError, match=msg):
            unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        unified_policy_loss(h, w, t, config="sft", backend="torch", temperature=torch.tensor(0.0))


@pytest.mark.parametrize("n", [0, -3, 0.0, torch.tensor(0), torch.tensor([-1.0])])
def test_num_items_in_batch_must_be_positive(n):
    h, w, t = _small()
    kw = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, num_items_in_batch=n)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        unified_policy_loss(h, w, t, config="dapo", backend="torch", **kw)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        policy_loss_from_logprobs(torch.zeros(4, 3), config="dapo", **kw)
    with pytest.raises(TypeError, match="num_items_in_batch must be a number"):
        unified_policy_loss(h, w, t, config="dapo", backend="torch", **{**kw, "num_items_in_batch": "7"})


@pytest.mark.parametrize("preset", ["grpo", "sft", "dapo", "ppo"])
def test_demo_fields_on_presets_without_demonstrations(preset):
    with pytest.raises(ValueError, match=r"LossConfig.demo_coef=0.5 has no effect: demo_part is None"):
        LossConfig.preset(preset, demo_coef=0.5)
    with pytest.raises(ValueError, match=r"LossConfig.hpt_gamma=0.2 .* needs demo_part='sft'"):
        LossConfig.preset(preset, hpt_gamma=0.2)
    with pytest.raises(ValueError, match=r"hpt_gamma=0.2 .* needs demo_part='sft'"):
        UnifiedPolicyLoss(preset, hpt_gamma=0.2)
    assert LossConfig.preset("hpt", demo_coef=0.5, hpt_gamma=0.2).demo_coef == 0.5
    assert LossConfig.preset("luffy", demo_coef=0.5).demo_coef == 0.5
    with pytest.raises(ValueError, match="hpt_gamma"):
        LossConfig.preset("luffy", hpt_gamma=0.2)


def test_nonfinite_hidden_row_is_named():
    h, w, t = _small(B=5)
    h[3, 1, 2] = float("nan")
    h[1, 0, 0] = float("inf")
    kw = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5]), group_ids=torch.tensor([0, 0, 1, 1, 1]))
    # the loss: an error naming the rows (the loss and dW would be NaN)
    with pytest.raises(FloatingPointError, match=r"rows \[1, 3\] .* dW / db"):
        unified_policy_loss(h, w, t, config="grpo", backend="torch", **kw)
    lp = torch.zeros(5, 3, dtype=torch.float64)
    lp[4, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rows \[4\]"):
        policy_loss_from_logprobs(lp, config="grpo", **kw)
    # masked out, the bad rows reach nothing: finite loss and gradients
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[[1, 3]] = False
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = unified_policy_loss(hh, ww, t, config="grpo", backend="torch", loss_mask=mask, **kw)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(ww.grad).all() and torch.isfinite(hh.grad).all()
    # token_logprobs: a warning naming the rows; the other rows' logp and dh are those of a clean run
    hh = h.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"rows \[1, 3\] .* dW and db"):
        logp = upg_kernels.token_logprobs(hh, w, t, backend="torch")
    logp.sum().backward()
    keep = [0, 2, 4]
    hc = h[keep].clone().requires_grad_(True)
    lc = upg_kernels.token_logprobs(hc, w, t[keep], backend="torch")
    lc.sum().backward()
    assert torch.equal(logp[keep].detach(), lc.detach()) and torch.equal(hh.grad[keep], hc.grad)
