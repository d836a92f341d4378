"""PPO-with-a-critic pieces and the reward-model loss: gae vs per-token reverse loops (verl's, and a
plain per-row one) on random masks; value_loss, whiten, kl_penalty_rewards and the KL controllers vs
their formulas; pairwise_reward_loss vs TRL 1.16's RewardTrainer.compute_loss."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from upg_kernels import (AdaptiveKLController, FixedKLController, gae, kl_penalty_rewards,
                         pairwise_reward_loss, value_loss, whiten)
from upg_kernels.ppo import reverse_linear_scan


def random_masks(B, T, g):
    """Right padding, left padding, holes (e.g. tool output), one token, all-masked, full rows."""
    m = torch.rand(B, T, generator=g) > 0.3
    m[0] = torch.arange(T) < T - 3                 # right padding
    m[1] = torch.arange(T) >= 4                    # left padding
    m[2] = False                                   # all masked
    m[3] = torch.arange(T) == 5                    # a single token
    m[4] = True                                    # full
    m[5] = (torch.arange(T) >= 2) & (torch.arange(T) < T - 2)   # both sides
    return m


def gae_verl_loop(r, v, m, gamma, lam):
    """verl's ``compute_gae_advantage_return`` loop (masked tokens carry nextvalues / lastgaelam),
    transcribed; inputs zero-filled at masked positions."""
    m = m.double()
    nextvalues, lastgaelam, out = 0.0, 0.0, []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = v[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + v


def gae_per_row_loop(r, v, m, gamma, lam):
    """Textbook GAE on each row's list of valid tokens, V = 0 after the last; 0 at masked positions."""
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        idx = m[b].nonzero().flatten().tolist()
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            nv = v[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            last = r[b, t] + gamma * nv - v[b, t] + gamma * lam * last
            adv[b, t] = last
    return adv, torch.where(m, adv + v, torch.zeros_like(adv))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5)])
@pytest.mark.parametrize("T", [1, 13, 16])
def test_gae_vs_reverse_loops(gamma, lam, T):
    g = torch.Generator().manual_seed(T)
    B = 8
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = random_masks(B, T, g) if T > 6 else torch.rand(B, T, generator=g) > 0.4
    rz, vz = torch.where(m, r, 0.0), torch.where(m, v, 0.0)
    # masked inputs are ignored: put NaN there
    adv, ret = gae(torch.where(m, r, math.nan), torch.where(m, v, math.nan), m, gamma=gamma, lam=lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    a_row, r_row = gae_per_row_loop(rz, vz, m, gamma, lam)
    torch.testing.assert_close(adv, a_row, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, r_row, rtol=1e-12, atol=1e-12)
    a_verl, r_verl = gae_verl_loop(rz, vz, m, gamma, lam)
    torch.testing.assert_close(adv[m], a_verl[m], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret[m], r_verl[m], rtol=1e-12, atol=1e-12)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_float32_long_sequence_and_dtype():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 600
    r = torch.randn(B, T, generator=g) * 0.1
    v = torch.randn(B, T, generator=g)
    m = random_masks(6, T, g)[:B] | (torch.rand(B, T, generator=g) > 0.5)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    assert adv.dtype == torch.float32 and not adv.requires_grad
    a64, r64 = gae_per_row_loop(r.double(), v.double(), m, 1.0, 0.95)
    torch.testing.assert_close(adv.double(), a64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ret.double(), r64, rtol=1e-4, atol=1e-4)


def test_reverse_linear_scan_vs_loop():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 37, generator=g, dtype=torch.float64)
    b = torch.randn(3, 37, generator=g, dtype=torch.float64)
    x, want = torch.zeros(3), torch.zeros_like(b)
    for t in reversed(range(37)):
        x = a[:, t] * x + b[:, t]
        want[:, t] = x
    torch.testing.assert_close(reverse_linear_scan(a, b), want, rtol=1e-12, atol=1e-12)


def test_gae_bad_input():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="values must have shape"):
        gae(r, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        gae(r, r, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, torch.ones(2, 3, dtype=torch.bool), lam=1.5)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B, T\]"):
        gae(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- value loss
@pytest.mark.parametrize("clip_range", [0.2, None])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_value_loss_vs_formula(clip_range, aggregation):
    g = torch.Generator().manual_seed(2)
    B, T = 6, 9
    m = random_masks(B, T, g)
    v = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    old = v.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    R = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss, metrics = value_loss(v, torch.where(m, old, math.nan), torch.where(m, R, math.nan), m,
                               clip_range=clip_range, aggregation=aggregation)
    # the formula, written per token
    terms, clipped = {}, 0
    for b in range(B):
        for t in range(T):
            if not m[b, t]:
                continue
            u = (v[b, t] - R[b, t]) ** 2
            if clip_range is None:
                terms[b, t] = 0.5 * u
                continue
            vc = old[b, t] + torch.clamp(v[b, t] - old[b, t], -clip_range, clip_range)
            c = (vc - R[b, t]) ** 2
            terms[b, t] = 0.5 * torch.maximum(u, c)
            clipped += int(c > u)
    rows = sorted({b for b, _ in terms})
    if aggregation == "token_mean":
        want = sum(terms.values()) / len(terms)
    elif aggregation == "seq_mean_token_mean":
        want = sum(sum(x for (b2, _), x in terms.items() if b2 == b) / int(m[b].sum()) for b in rows) / len(rows)
    else:
        want = sum(terms.values()) / len(rows)
    torch.testing.assert_close(loss, want)
    gv, = torch.autograd.grad(loss, v)
    gw, = torch.autograd.grad(want, v)
    torch.testing.assert_close(gv, gw)
    assert metrics["vf_clipfrac"] == pytest.approx(clipped / len(terms))
    if clip_range is not None:
        assert 0 < metrics["vf_clipfrac"] < 1
    vv, RR = v.detach()[m], R[m]
    assert metrics["explained_variance"] == pytest.approx(float(1 - (RR - vv).var(unbiased=False) / RR.var(unbiased=False)))


def test_value_loss_bad_input():
    z, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(z, z, z, m, clip_range=0)
    with pytest.raises(ValueError, match="aggregation"):
        value_loss(z, z, z, m, aggregation="sum")
    with pytest.raises(ValueError, match="returns must have shape"):
        value_loss(z, z, torch.zeros(2, 4), m)


# ---------------------------------------------------------------------------------------------- whiten
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_vs_formula(shift_mean):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3 + 2
    m = random_masks(6, 8, g)[:5]
    out = whiten(torch.where(m, x, math.nan), m, shift_mean=shift_mean)
    vals = x[m]
    n = vals.numel()
    mean = vals.sum() / n
    var = ((vals - mean) ** 2).sum() / (n - 1)               # unbiased, as TRL / verl masked_whiten
    want = (vals - mean) / torch.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    torch.testing.assert_close(out[m], want)
    assert (out[~m] == 0).all()
    if shift_mean:
        assert abs(float(out[m].mean())) < 1e-12
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.eye(5, 8, dtype=torch.bool) & (torch.arange(8) == 0))


# ---------------------------------------------------------------------------------------------- KL in reward
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_penalty_rewards_vs_loop(kl_type):
    g = torch.Generator().manual_seed(4)
    B, T = 6, 10
    m = random_masks(B, T, g)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    out = kl_penalty_rewards(scores, torch.where(m, lp, math.nan), ref, m, kl_coef=0.05, kl_type=kl_type)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        valid = m[b].nonzero().flatten().tolist()
        for t in valid:
            d = lp[b, t] - ref[b, t]
            kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[kl_type]
            want[b, t] = -0.05 * kl
        if valid:
            want[b, valid[-1]] += scores[b]
    torch.testing.assert_close(out, want)
    assert (out[2] == 0).all()          # the all-masked row
    with pytest.raises(ValueError, match=r"scores must have shape \[B=6\]"):
        kl_penalty_rewards(scores[:3], lp, ref, m, 0.1)
    with pytest.raises(ValueError, match="kl_type"):
        kl_penalty_rewards(scores, lp, ref, m, 0.1, kl_type="k4")


def test_kl_controllers_vs_formula():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    beta = 0.2
    for kl, n in [(3.0, 256), (6.0, 256), (12.0, 512), (100.0, 256), (0.0, 128), (6.6, 64)]:
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + err * n / 10000
        assert ctl.update(kl, n) == pytest.approx(beta, rel=1e-15)
        assert ctl.value == pytest.approx(beta, rel=1e-15)
    state = ctl.state_dict()
    ctl2 = AdaptiveKLController(1.0, target=6.0, horizon=10000)
    ctl2.load_state_dict(state)
    assert ctl2.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(50.0, 1000) == 0.05 and fixed.value == 0.05
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


# ---------------------------------------------------------------------------------------------- RM loss
def trl_reward_loss(chosen, rejected, margin=None, center=None):
    """TRL 1.16 ``RewardTrainer.compute_loss`` (its own code, unbound): a model whose ``logits`` are
    the 2B rewards (chosen rows first), eval mode."""
    from trl import RewardTrainer
    logits = torch.cat([chosen, rejected])[:, None]
    model = SimpleNamespace(training=False)
    model_fn = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                              _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(trainer, model_fn, inputs)


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_pairwise_reward_loss_vs_trl(with_margin, center):
    g = torch.Generator().manual_seed(5)
    c = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(7, generator=g, dtype=torch.float64) if with_margin else None
    ours = pairwise_reward_loss(c, r, margin=margin, center_coef=center or 0.0)
    theirs = trl_reward_loss(c, r, margin, center)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [c, r]), torch.autograd.grad(theirs, [c, r])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # [B, 1] rewards (a scalar head's output) are accepted
    torch.testing.assert_close(pairwise_reward_loss(c[:, None], r[:, None], margin=margin,
                                                    center_coef=center or 0.0), ours)


def test_pairwise_reward_loss_bad_input():
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        pairwise_reward_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        pairwise_reward_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(4))
    with pytest.raises(TypeError, match="chosen"):
        pairwise_reward_loss([1.0], torch.zeros(1))


# ---------------------------------------------------------------------------------------------- verl's code
# verl is no test dependency (it pulls ray); `bash scripts/setup_verl_oracle.sh` builds .venv-verl on top
# of .venv, then `.venv-verl/bin/python -m pytest tests/test_ppo_value.py -k verl` runs these.
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
def test_gae_whiten_vs_verl(gamma, lam):
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(6)
    B, T = 8, 14
    m = random_masks(B, T, g)
    m[2, 0] = True                                  # verl's masked_whiten needs no all-masked batch
    r = torch.where(m, torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    v = torch.where(m, torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
    verl_adv, verl_ret = core.compute_gae_advantage_return(r, v, m.double(), gamma, lam)
    torch.testing.assert_close(ret[m], verl_ret[m], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whiten(adv, m)[m], verl_adv[m], rtol=1e-10, atol=1e-10)   # verl whitens


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_value_loss_kl_controller_vs_verl(aggregation):
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(7)
    B, T = 6, 9
    m = random_masks(B, T, g)
    v = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    old = v.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    R = torch.randn(B, T, generator=g, dtype=torch.float64)
    ours, metrics = value_loss(v, old, R, m, clip_range=0.2, aggregation=aggregation)
    theirs, clipfrac = core.compute_value_loss(v, R, old, m.double(), 0.2,
                                               loss_agg_mode=aggregation.replace("_", "-"))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    for a, b in zip(torch.autograd.grad(ours, v), torch.autograd.grad(theirs, v)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert metrics["vf_clipfrac"] == pytest.approx(float(clipfrac))
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    for ours_kl, verl_kl in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")):
        rw = kl_penalty_rewards(torch.zeros(B, dtype=torch.float64), lp, ref, m, 1.0, kl_type=ours_kl)
        torch.testing.assert_close(-rw[m], core.kl_penalty(lp, ref, verl_kl)[m])
    a, b = AdaptiveKLController(0.1, 6.0, 1000), core.AdaptiveKLController(0.1, 6.0, 1000)
    for kl, n in [(3.0, 64), (9.0, 128), (6.5, 32)]:
        a.update(kl, n)
        b.update(kl, n)
        assert a.value == pytest.approx(float(b.value), rel=1e-15)
