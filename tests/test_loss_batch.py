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
