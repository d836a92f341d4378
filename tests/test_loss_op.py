"""The loss as one op: ``policy_loss_from_logprobs`` equals ``unified_policy_loss`` for every preset,
the op's backward scales with ``grad_output``, per-token outputs (ratio, clip flags, KL) follow the
formulas, and masked NaN inputs cannot reach the loss or the gradients."""
import pytest
import torch

from upg_kernels import LossConfig, policy_loss_from_logprobs, token_logprobs, unified_policy_loss
from upg_kernels.losses import PRESETS

from test_losses import B, T, make_case

ALL = sorted(PRESETS)


@pytest.mark.parametrize("name", ALL)
def test_from_logprobs_equals_hidden_entry(name):
    cfg, hid, w, b, tgt, kw = make_case(name, 1, dtype=torch.float64)
    h1 = hid.clone().requires_grad_(True)
    out1 = unified_policy_loss(h1, w, tgt, config=cfg, bias=b, backend="torch", **kw)
    out1.loss.backward()

    h2 = hid.clone().requires_grad_(True)
    logp, ent = token_logprobs(h2, w, tgt, bias=b, return_entropy=True, backend="torch")
    valid = tgt != -100
    kw2 = dict(kw)
    kw2["loss_mask"] = kw["loss_mask"] & valid
    out2 = policy_loss_from_logprobs(logp, config=cfg, entropy=ent, **kw2)
    out2.loss.backward()
    assert torch.allclose(out1.loss, out2.loss, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    for k, v in out1.metrics.items():
        assert out2.metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for f in ("ratio", "kl", "coef_logp", "coef_entropy"):
        a, r = getattr(out2, f), getattr(out1, f)
        sel = kw2["loss_mask"]
        assert torch.allclose(a[sel], r[sel], rtol=1e-10, atol=1e-12), f
    assert torch.equal(out1.clip_low, out2.clip_low) and torch.equal(out1.clip_high, out2.clip_high)


def test_backward_scales_with_grad_output():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 2, dtype=torch.float64)
    grads = []
    for scale in (1.0, -2.5):
        h = hid.clone().requires_grad_(True)
        wt = w.clone().requires_grad_(True)
        out = unified_policy_loss(h, wt, tgt, config=cfg, bias=b, backend="torch", **kw)
        (scale * out.loss).backward()
        grads.append((h.grad, wt.grad))
    for g1, g2 in zip(*grads):
        assert torch.allclose(-2.5 * g1, g2, rtol=1e-12, atol=1e-14)


def test_per_token_outputs_follow_the_formulas():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 3, dtype=torch.float64, overrides=dict(kl_coef=0.1))
    out = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", **kw)
    m = kw["loss_mask"] & (tgt != -100)
    d = out.logprobs - kw["old_logprobs"].double()
    r = torch.exp(d)
    assert torch.allclose(out.ratio[m], r[m], rtol=1e-6)
    assert not bool((out.clip_high & (r <= 1 + cfg.eps_high))[m].any())
    assert not bool((out.clip_low & (r >= 1 - cfg.eps_low))[m].any())
    dr = kw["ref_logprobs"].double() - out.logprobs
    k3 = torch.exp(dr) - dr - 1.0
    assert torch.allclose(out.kl[m], k3[m], rtol=1e-9, atol=1e-12)
    assert out.clip_low.dtype == torch.bool and out.ratio.shape == tgt.shape


def test_from_logprobs_masked_nan_and_errors():
    cfg = LossConfig.preset("grpo")
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    with torch.no_grad():
        lp[0, 2] = float("nan")
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 1.0], dtype=torch.float64)
    out = policy_loss_from_logprobs(lp, config=cfg, loss_mask=mask, rewards=rewards, group_size=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all() and lp.grad[0, 2] == 0
    with pytest.raises(ValueError, match="logprobs must have shape"):
        policy_loss_from_logprobs(lp.detach()[None], config=cfg)
    with pytest.raises(ValueError, match="entropy must have"):
        policy_loss_from_logprobs(lp.detach(), config=cfg, entropy=torch.zeros(B), rewards=rewards,
                                  group_size=3)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        policy_loss_from_logprobs(lp.detach(), config=LossConfig.preset("grpo", entropy_coef=0.01),
                                  rewards=rewards, group_size=3)
    with pytest.raises(TypeError, match="logprobs must be a floating"):
        policy_loss_from_logprobs(torch.zeros(B, T, dtype=torch.long), config=cfg)
    with pytest.raises(ValueError, match="loss_mask must have shape"):
        policy_loss_from_logprobs(lp.detach(), config=cfg, loss_mask=mask[:, :2], rewards=rewards,
                                  group_size=3)
