"""``upg_ppo_loss`` (the fused whole loss as a verl engine loss) against verl 0.9.1's own ``ppo_loss``.

The batch is built as verl's engine worker hands it to the loss: ``data`` a TensorDict of jagged (nested)
``prompts`` / ``responses`` / ``response_mask`` / ``old_log_probs`` / ``advantages`` / ``rollout_is_weights`` /
``ref_log_prob`` with ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` as non-tensor data, and
``model_output`` jagged log-probs and entropy over the whole sequences (prompt + response), which verl's
``no_padding_2_padding`` slices. One response is fully masked, one row has zero advantage.
"""
import os

import pytest
import torch

if os.environ.get("UPG_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl", reason="verl 0.9.1 is not installed in this venv; .ci/run runs these tests "
                                       "in .venv-verl")

import verl.workers.utils.losses as verl_losses  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

import upg_kernels.integrations.verl as upg_verl  # noqa: E402
from upg_kernels.integrations.verl import upg_ppo_loss, verl_linear_cross_entropy  # noqa: E402

pytestmark = pytest.mark.verl

P = [3, 2, 4, 1, 2]   # prompt lengths
R = [5, 2, 6, 3, 4]   # response lengths
ZERO_ADV_ROW, MASKED_ROW = 2, 3
INFOS = [dict(dp_size=1, batch_num_tokens=None, global_batch_size=None),
         dict(dp_size=2, batch_num_tokens=23, global_batch_size=9)]


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _data(seed, info, row_const_is=False):
    g = torch.Generator().manual_seed(seed)
    mask = [(torch.rand(r, generator=g) > 0.25).long() for r in R]
    mask[0][:] = 1
    mask[MASKED_ROW][:] = 0
    adv = [torch.full((r,), float(torch.randn(1, generator=g))) for r in R]
    adv[ZERO_ADV_ROW][:] = 0.0
    adv[1][:] = -1.0
    isw = [torch.rand(r, generator=g) * 1.5 + 0.25 for r in R]
    if row_const_is:   # verl's GSPO-token gradient gives each token its own IS weight, ours the row's mean
        isw = [w[:1].expand(len(w)).clone() for w in isw]
    seq_lp = -torch.rand(sum(P) + sum(R), generator=g, dtype=torch.float64) * 2
    seq_ent = torch.rand(sum(P) + sum(R), generator=g, dtype=torch.float64) * 3
    resp_lp = _responses(seq_lp)
    old = [lp + 0.3 * torch.randn(len(lp), generator=g, dtype=torch.float64) for lp in resp_lp]
    old[1][:2] = resp_lp[1][:2] - 1.0   # negative advantage, large ratio: the dual clip
    ref = [lp + 0.5 * torch.randn(len(lp), generator=g, dtype=torch.float64) for lp in resp_lp]
    f = torch.float32
    data = tu.get_tensordict(
        dict(prompts=_nested([torch.ones(p, dtype=torch.long) for p in P]),
             responses=_nested([torch.ones(r, dtype=torch.long) for r in R]),
             response_mask=_nested(mask), old_log_probs=_nested([o.to(f) for o in old]),
             advantages=_nested(adv), rollout_is_weights=_nested(isw), ref_log_prob=_nested([r.to(f) for r in ref])),
        dict(info))
    return data, seq_lp.to(f), seq_ent.to(f)


def _responses(seq):
    """The response part of a whole-sequence per-token tensor (verl's left shift by one)."""
    out, end = [], 0
    for p, r in zip(P, R):
        end += p + r
        out.append(seq[end - r - 1:end - 1])
    return out


def _offsets():
    return torch.tensor([0] + [p + r for p, r in zip(P, R)]).cumsum(0)


def _config(mode, agg, kl_type="low_var_kl", entropy_coeff=0.01, use_kl=True):
    kw = dict(clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=1.5)
    if mode.endswith("gspo"):
        kw.update(clip_ratio_low=3e-3, clip_ratio_high=4e-3)
    return FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                           clip_ratio=0.2, loss_agg_mode=agg, entropy_coeff=entropy_coeff, use_kl_loss=use_kl,
                           kl_loss_coef=0.05, kl_loss_type=kl_type, policy_loss=PolicyLossConfig(loss_mode=mode),
                           **kw)


def _run(fn, mode, agg, data, seq_lp, seq_ent, **kw):
    lp = seq_lp.clone().requires_grad_(True)
    ent = seq_ent.clone().requires_grad_(True)
    out = dict(log_probs=torch.nested.nested_tensor_from_jagged(lp, _offsets()),
               entropy=torch.nested.nested_tensor_from_jagged(ent, _offsets()))
    loss, metrics = fn(_config(mode, agg, **kw), out, data)
    loss.backward()
    zero = torch.zeros_like(seq_ent)
    return loss.detach(), lp.grad, zero if ent.grad is None else ent.grad, metrics


PAIRS = [("vanilla", "upg_fused_ppo"), ("vanilla", "upg_fused_grpo"), ("gspo", "upg_fused_gspo"),
         ("cispo", "upg_fused_cispo")]


@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_same_loss_grads_metrics_as_verl_ppo_loss(pair, agg, info):
    """verl's ppo_loss (policy + entropy bonus + low_var_kl loss) == our one fused loss: loss, gradients
    w.r.t. the log-probs and the entropy, every metric and its aggregation type. Both are called through
    verl's (plugin-wrapped) ``ppo_loss``: the loss_mode picks verl's or ours."""
    verl_mode, upg_mode = pair
    data, seq_lp, seq_ent = _data(11 + info, INFOS[info], row_const_is=verl_mode == "gspo")
    l0, g0, e0, m0 = _run(verl_losses.ppo_loss, verl_mode, agg, data, seq_lp, seq_ent)
    l1, g1, e1, m1 = _run(verl_losses.ppo_loss, upg_mode, agg, data, seq_lp, seq_ent)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-8)
    assert e1.abs().sum() > 0 and g1.abs().sum() > 0
    assert set(m1) == set(m0) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss",
                                  "actor/entropy_loss", "kl_loss", "kl_coef"}
    for k, v0 in m0.items():
        v1 = m1[k]
        if k == "kl_coef":
            assert v1 == v0
            continue
        assert v1.aggregation == v0.aggregation, k
        assert v1.aggregate() == pytest.approx(v0.aggregate(), rel=1e-5, abs=1e-7), k
    assert m0["kl_loss"].aggregate() > 0
    if verl_mode == "vanilla":
        assert m0["actor/pg_clipfrac"].aggregate() > 0


@pytest.mark.parametrize("kl_type", ["mse", "kl"])
def test_other_kl_types(kl_type):
    data, seq_lp, seq_ent = _data(5, INFOS[0])
    l0, g0, e0, m0 = _run(verl_losses.ppo_loss, "vanilla", "token-mean", data, seq_lp, seq_ent, kl_type=kl_type)
    l1, g1, e1, m1 = _run(upg_ppo_loss, "upg_ppo", "token-mean", data, seq_lp, seq_ent, kl_type=kl_type)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert m1["kl_loss"].aggregate() == pytest.approx(m0["kl_loss"].aggregate(), rel=1e-5, abs=1e-7)


def test_sapo_seq_mean_token_mean():
    data, seq_lp, seq_ent = _data(3, INFOS[1])
    l0, g0, e0, _ = _run(verl_losses.ppo_loss, "sapo", "seq-mean-token-mean", data, seq_lp, seq_ent)
    l1, g1, e1, _ = _run(upg_ppo_loss, "upg_sapo", "seq-mean-token-mean", data, seq_lp, seq_ent)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-8)


def test_clear_errors():
    data, seq_lp, seq_ent = _data(0, INFOS[0])
    with pytest.raises(ValueError, match="upg_sapo.*loss_agg_mode"):
        _run(upg_ppo_loss, "upg_sapo", "token-mean", data, seq_lp, seq_ent)
    with pytest.raises(ValueError, match="loss_mode=upg_<preset>.*'vanilla'"):
        _run(upg_ppo_loss, "vanilla", "token-mean", data, seq_lp, seq_ent)
    with pytest.raises(ValueError, match="kl_loss_type.*'abs'"):
        _run(upg_ppo_loss, "upg_grpo", "token-mean", data, seq_lp, seq_ent, kl_type="abs")
    with pytest.raises(ValueError, match="unknown verl preset 'nope'"):
        _run(upg_ppo_loss, "upg_fused_nope", "token-mean", data, seq_lp, seq_ent)


def test_zero_advantage_rows_get_exactly_zero_gradient():
    """entropy_coeff=0, no KL: the rows with advantage 0 get exactly 0 gradient w.r.t. the log-probs, and
    through our kernel (verl's linear_cross_entropy signature) exactly 0 w.r.t. their hidden states."""
    data, _, _ = _data(1, INFOS[0])
    g = torch.Generator().manual_seed(2)
    N, H, V = sum(P) + sum(R), 8, 13
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    logp, ent = verl_linear_cross_entropy(hidden, weight, labels, 1.0, "none")
    data["old_log_probs"] = _nested(_responses(logp.detach()))   # on-policy: no token is clipped
    out = dict(log_probs=torch.nested.nested_tensor_from_jagged(logp, _offsets()),
               entropy=torch.nested.nested_tensor_from_jagged(ent, _offsets()))
    loss, _ = upg_ppo_loss(_config("upg_fused_grpo", "token-mean", entropy_coeff=0.0, use_kl=False), out, data)
    loss.backward()
    pos = torch.arange(N)
    rows = _responses(pos)
    resp_mask = data["response_mask"].to_padded_tensor(0).bool()
    live = torch.cat([r[resp_mask[i, :len(r)]] for i, r in enumerate(rows)
                      if i not in (ZERO_ADV_ROW, MASKED_ROW)])
    dead = torch.ones(N, dtype=torch.bool)
    dead[live] = False
    assert hidden.grad[rows[ZERO_ADV_ROW]].abs().max() == 0   # the zero-advantage row: exactly nothing
    assert hidden.grad[dead].abs().max() == 0
    assert (hidden.grad[live].abs().sum(-1) > 0).all()


def test_without_entropy_output():
    """calculate_entropy=False: no entropy in the model output, so no entropy term or metric (as verl)."""
    data, seq_lp, _ = _data(4, INFOS[1])
    results = []
    for mode in ("vanilla", "upg_fused_grpo"):
        lp = seq_lp.clone().requires_grad_(True)
        loss, m = verl_losses.ppo_loss(_config(mode, "token-mean"),
                                       dict(log_probs=torch.nested.nested_tensor_from_jagged(lp, _offsets())), data)
        loss.backward()
        results.append((loss.detach(), lp.grad, m))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert set(m1) == set(m0) and "actor/entropy_loss" not in m1
    assert m1["actor/pg_loss"].aggregate() == pytest.approx(m0["actor/pg_loss"].aggregate(), rel=1e-5, abs=1e-7)


def test_plugin_routes_only_fused_modes():
    """verl's modes reach verl's own ppo_loss (the original function), upg_fused_<preset> ours."""
    assert upg_verl.FUSED_PREFIX == "upg_fused_"
    data, seq_lp, seq_ent = _data(6, INFOS[0])
    direct = _run(verl_losses.ppo_loss._upg_original, "vanilla", "token-mean", data, seq_lp, seq_ent)
    routed = _run(verl_losses.ppo_loss, "vanilla", "token-mean", data, seq_lp, seq_ent)
    assert torch.equal(direct[0], routed[0]) and torch.equal(direct[1], routed[1])
    ours = _run(upg_ppo_loss, "upg_fused_ppo", "token-mean", data, seq_lp, seq_ent)
    routed = _run(verl_losses.ppo_loss, "upg_fused_ppo", "token-mean", data, seq_lp, seq_ent)
    assert torch.equal(ours[0], routed[0]) and torch.equal(ours[1], routed[1])
