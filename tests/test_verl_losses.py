"""``loss_mode=upg_<preset>`` against verl 0.9.1's own registered policy losses (real verl code).

For verl's ``vanilla``, ``gspo``, ``cispo`` and ``sapo`` and every ``loss_agg_mode``, with random masks (one
row fully masked), rollout IS weights, dual-clip, asymmetric clip ranges and verl's ``global_batch_info``,
the registered upg loss gives verl's loss, gradient w.r.t. the log-probs and metrics.
"""
import os

import pytest
import torch

if os.environ.get("UPG_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl", reason="verl 0.9.1 is not installed in this venv; .ci/run runs these tests "
                                       "in .venv-verl")

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

import upg_kernels.integrations.verl as upg_verl  # noqa: E402

pytestmark = pytest.mark.verl
AGG = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
PAIRS = [("vanilla", "upg_ppo"), ("vanilla", "upg_grpo"), ("vanilla", "upg_dapo"), ("gspo", "upg_gspo"),
         ("cispo", "upg_cispo"), ("sapo", "upg_sapo")]


def _config(verl_mode, info):
    kw = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
              clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=1.5)
    if verl_mode == "gspo":
        kw.update(clip_ratio_low=3e-3, clip_ratio_high=4e-3)
    cfg = FSDPActorConfig(**kw)
    cfg.global_batch_info.update(info)
    return cfg


def _batch(seed, B=5, T=7, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[2] = 0.0   # a zero-advantage row
    adv[1] = -1.0  # a negative row whose first ratios pass the dual clip c
    old[1, :3] = logp[1, :3].double() - 1.0
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = True
    mask[3] = False    # a fully masked row
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.25
    return logp.float(), old.float(), adv.float(), mask, isw.float()


INFOS = [dict(), dict(dp_size=2, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=11)]


def test_registered():
    for preset in upg_verl.VERL_PRESETS:
        assert f"upg_{preset}" in POLICY_LOSS_REGISTRY
    assert {"upg_grpo", "upg_dapo", "upg_cispo", "upg_sapo", "upg_gspo", "upg_luffy", "upg_vespo"} <= set(
        POLICY_LOSS_REGISTRY)
    assert "upg_sft" not in POLICY_LOSS_REGISTRY   # advantage-free presets are not policy losses


@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("with_is", [False, True])
def test_same_loss_grad_metrics_as_verl(pair, agg, info, with_is):
    verl_mode, upg_mode = pair
    logp, old, adv, mask, isw = _batch(7 + info)
    cfg = _config(verl_mode, INFOS[info])
    results = []
    for mode in (verl_mode, upg_mode):
        lp = logp.clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(mode)(old_log_prob=old, log_prob=lp, advantages=adv,
                                                 response_mask=mask, loss_agg_mode=agg, config=cfg,
                                                 rollout_is_weights=isw if with_is else None)
        loss.backward()
        results.append((loss.detach(), lp.grad, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=1e-6)
    if verl_mode == "gspo" and with_is:
        # verl's GSPO-token gradient gives token t its own IS weight, ours (the sequence ratio's exact
        # gradient) the row's mean weight: equal when the weights are constant along each row
        _, _, _, _, isw_rows = _batch(7 + info)
        isw_rows = isw_rows[:, :1].expand_as(isw_rows)
        grads = []
        for mode in (verl_mode, upg_mode):
            lp = logp.clone().requires_grad_(True)
            get_policy_loss_fn(mode)(old, lp, adv, mask, agg, cfg, isw_rows)[0].backward()
            grads.append(lp.grad)
        g0, g1 = grads
    torch.testing.assert_close(g1, g0, rtol=2e-5, atol=1e-7)
    assert g1[~mask].abs().max() == 0   # masked positions get exactly no gradient
    assert set(m0) == set(m1)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    if verl_mode in ("vanilla", "cispo"):
        assert m0["actor/pg_clipfrac"] > 0   # the clipping is exercised
    if verl_mode == "vanilla":
        assert m0["actor/pg_clipfrac_lower"] > 0


def test_nothing_counted_twice():
    """verl adds the entropy bonus and the KL loss itself: the registered upg policy term has neither."""
    cfg = upg_verl.verl_loss_config("hpt_release", _config("vanilla", {}))
    assert cfg.kl_coef == 0 and cfg.entropy_coef == 0 and cfg.demo_part is None


def test_bad_agg_mode():
    logp, old, adv, mask, _ = _batch(0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        get_policy_loss_fn("upg_grpo")(old, logp, adv, mask, "seq-sum", _config("vanilla", {}))


@pytest.mark.parametrize("preset", upg_verl.VERL_PRESETS)
def test_every_registered_preset_runs(preset):
    """Each upg_<preset> gives a finite loss, a gradient only at valid tokens, and verl's metric names."""
    logp, old, adv, mask, isw = _batch(3)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn(f"upg_{preset}")(old, lp, adv, mask, "token-mean", _config("vanilla", {}), isw)
    loss.backward()
    assert torch.isfinite(loss) and lp.grad[mask].abs().sum() > 0 and lp.grad[~mask].abs().max() == 0
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
