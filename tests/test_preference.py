"""preference_loss / sequence_logprobs: every preset vs an independent float64 reference (materialized
logits), vs TRL 1.16's own DPO / CPO / ORPO loss code on the same log-prob sums, vs Liger-Kernel's
fused linear DPO / SimPO / ORPO on shared weights; bf16, padding, the Triton backend, bad input,
and the docs table."""
import math
import pathlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import upg_kernels
from upg_kernels import PREFERENCE_PRESETS, PreferenceConfig, preference_loss, sequence_logprobs
from upg_kernels.preference.config import PREFERENCE_COLUMNS
from upg_kernels.preference.reference import preference_loss_reference as reference_preference_loss
from upg_kernels.preference.reference import preference_token_logprobs_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, T, H, V = 3, 7, 16, 37          # B pairs -> 2B rows; V is not a power of two


def make_batch(seed=0, dtype=torch.float64, *, bias=True, loss_mask=False):
    """2B rows: prompt tokens (ignore_index) first, then a completion of varying length, then padding
    (ignore_index); optionally a loss_mask hole inside one completion."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64) * 0.8
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    t = torch.randint(0, V, (2 * B, T), generator=g)
    prompt = [1, 2, 1, 3, 1, 2]
    length = [4, 2, 5, 1, 3, 4]
    for i in range(2 * B):
        t[i, :prompt[i]] = -100
        t[i, prompt[i] + length[i]:] = -100
    m = None
    if loss_mask:
        m = torch.ones(2 * B, T, dtype=torch.bool)
        m[0, 2] = False            # a hole in a chosen completion
        m[5, 3] = False            # and in a rejected one
    ref_h = h + 0.3 * torch.randn(h.shape, generator=g, dtype=torch.float64)
    ref_w = w + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), t, m, ref_h, ref_w


ref_token_logps = preference_token_logprobs_reference


def ref_sums(ref_h, ref_w, b, t, m=None):
    lp, _ = ref_token_logps(ref_h, ref_w, b, t, m)
    s = lp.sum(-1)
    return s[:B], s[B:]


def grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


def leaf(*xs):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]


# ---------------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("name", sorted(PREFERENCE_PRESETS))
def test_preset_vs_float64_reference(name):
    cfg = PreferenceConfig.preset(name)
    h, w, b, t, m, ref_h, ref_w = make_batch(1, torch.float32, loss_mask=True)
    rc, rr = ref_sums(ref_h, ref_w, b, t, m) if cfg.use_reference else (None, None)
    h, w, b = leaf(h, w, b)
    out = preference_loss(h, w, t, config=name, ref_chosen_logps=rc, ref_rejected_logps=rr,
                          loss_mask=m, bias=b, backend="torch")
    h64, w64, b64 = leaf(h.double(), w.double(), b.double())
    ref = reference_preference_loss(h64, w64, b64, t, m, rc, rr, cfg)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-5, atol=1e-6)
    for g, g64 in zip(grads(out.loss, h, w, b), grads(ref, h64, w64, b64)):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=2e-6)
    # the per-sequence outputs and rewards
    lp, valid = ref_token_logps(h64, w64, b64, t, m)
    seq = lp.sum(-1) / (valid.sum(-1) if cfg.length_normalize else 1)
    torch.testing.assert_close(out.chosen_logps.double(), seq[:B].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.double(), seq[B:].detach(), rtol=1e-5, atol=1e-5)
    assert not out.chosen_rewards.requires_grad
    for k in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "nll", "loss"):
        assert isinstance(out.metrics[k], float) and math.isfinite(out.metrics[k])
    acc = float((out.chosen_rewards > out.rejected_rewards).float().mean())
    assert out.metrics["reward_accuracy"] == acc
    torch.testing.assert_close(out.metrics["nll"], float(-lp[:B].sum().detach() / valid[:B].sum()), rtol=1e-5, atol=1e-6)


def test_temperature_and_graph_goes_through_the_fused_op():
    """temperature divides the logits of the policy; the autograd graph reaches hidden / weight only
    through the fused token_logprobs op (no matmul node: logits are never materialized)."""
    h, w, b, t, m, ref_h, ref_w = make_batch(12, torch.float64)
    rc, rr = ref_sums(ref_h, ref_w, b, t)
    h1, w1 = leaf(h, w)
    out = preference_loss(h1, w1, t, config="rpo", ref_chosen_logps=rc, ref_rejected_logps=rr, bias=b,
                          temperature=0.7, backend="torch")
    cfg = PreferenceConfig.preset("rpo")
    h2, w2 = leaf(h, w)
    lp, valid = ref_token_logps(h2, w2, b, t, temperature=0.7)
    s = lp.sum(-1)
    z = cfg.beta * ((s[:B] - rc) - (s[B:] - rr))
    want = -F.logsigmoid(z).mean() - lp[:B].sum() / valid[:B].sum()
    torch.testing.assert_close(out.loss, want)
    for g, g_ref in zip(grads(out.loss, h1, w1), grads(want, h2, w2)):
        torch.testing.assert_close(g, g_ref)
    names, seen, stack = [], set(), [out.loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack += [nxt for nxt, _ in fn.next_functions]
    assert any("upg_kernels_token_logprobs" in n for n in names)
    assert not any(n.startswith(("MmBackward", "AddmmBackward", "BmmBackward", "LogSoftmaxBackward"))
                   for n in names)


def test_bf16_inputs_vs_float64_reference():
    cfg = PreferenceConfig.preset("rpo", beta=0.5)
    h, w, b, t, m, ref_h, ref_w = make_batch(2, torch.bfloat16)
    rc, rr = ref_sums(ref_h, ref_w, None, t)
    h, w = leaf(h, w)
    out = preference_loss(h, w, t, config=cfg, ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch")
    assert out.loss.dtype == torch.float32 and out.chosen_logps.dtype == torch.float32
    h64, w64 = leaf(h.double(), w.double())   # the same (bf16-rounded) values
    ref = reference_preference_loss(h64, w64, None, t, None, rc, rr, cfg)
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-2, atol=2e-2)
    for g, g64 in zip(grads(out.loss, h, w), grads(ref, h64, w64)):
        assert g.dtype == torch.bfloat16
        assert (g.double() - g64).norm() <= 3e-2 * g64.norm()


def test_sequence_logprobs_sum_mean_and_padding_invariance():
    h, w, b, t, m, _, _ = make_batch(3, torch.float64, loss_mask=True)
    h, = leaf(h)
    lp, valid = ref_token_logps(h, w, b, t, m)
    s = sequence_logprobs(h, w, t, loss_mask=m, bias=b, backend="torch")
    a = sequence_logprobs(h, w, t, loss_mask=m, bias=b, average=True, backend="torch")
    torch.testing.assert_close(s, lp.sum(-1))
    torch.testing.assert_close(a, lp.sum(-1) / valid.sum(-1))
    g, = torch.autograd.grad(s.sum(), h)
    g_ref, = torch.autograd.grad(lp.sum(), h)
    torch.testing.assert_close(g, g_ref)
    # extra right padding (any hidden state there) does not change anything
    h2 = torch.cat([h.detach(), torch.randn(2 * B, 3, H, dtype=h.dtype)], 1)
    t2 = torch.cat([t, torch.full((2 * B, 3), -100)], 1)
    m2 = torch.cat([m, torch.ones(2 * B, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(sequence_logprobs(h2, w, t2, loss_mask=m2, bias=b, backend="torch"), s.detach())
    # a row without a valid token: 0 (sum and mean)
    t3 = t.clone()
    t3[1] = -100
    s3 = sequence_logprobs(h, w, t3, average=True, backend="torch")
    assert s3[1] == 0 and torch.isfinite(s3).all()


def test_triton_backend_matches_torch():
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b, t, m, ref_h, ref_w = make_batch(4, torch.float32, loss_mask=True)
    rc, rr = ref_sums(ref_h, ref_w, b, t, m)
    res = {}
    for backend in ("torch", "triton"):
        hh, ww, bb = leaf(h.to(dev), w.to(dev), b.to(dev))
        out = preference_loss(hh, ww, t.to(dev), config="rpo", ref_chosen_logps=rc.to(dev),
                              ref_rejected_logps=rr.to(dev), loss_mask=m.to(dev), bias=bb, backend=backend)
        res[backend] = (out.loss, *grads(out.loss, hh, ww, bb))
    for x, y in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- TRL 1.16
class _FusedHeadLM:
    """A causal LM whose last hidden states are ``hidden`` with lm_head ``(weight, bias)``, answering
    TRL's ``model(..., labels=labels, fused_lm_head=True)`` with per-token log-probs of ``labels[:, 1:]``
    (0 where -100), computed from materialized float64 logits."""

    training = False

    def __init__(self, h, w, b):
        self.h, self.w, self.b = h, w, b

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=True, **_):
        lp, _v = ref_token_logps(self.h, self.w, self.b, labels[:, 1:])
        zeros = torch.zeros_like(lp.detach())
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def trl_dpo_loss(h, w, b, t, ref_c, ref_r, *, loss_types, loss_weights, beta, label_smoothing=0.0):
    """TRL 1.16 ``DPOTrainer._compute_loss`` (its own code, unbound) with the minimum trainer state:
    precomputed reference log-probs, reverse-KL DPO, no weighting / aux loss / ld_alpha."""
    from trl import DPOTrainer
    lm = _FusedHeadLM(h, w, b)
    trainer = SimpleNamespace(
        model=lm, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    valid = t != -100
    input_ids = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), t.clamp(min=0)], 1)
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), valid.long()], 1)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  completion_mask=completion_mask, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = DPOTrainer._compute_loss(trainer, lm, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


TRL_DPO_CASES = [  # (our preset / overrides, TRL loss_types, loss_weights)
    ("dpo", {}, ["sigmoid"], [1.0]),
    ("hinge", {"beta": 0.3}, ["hinge"], [1.0]),
    ("ipo", {"beta": 0.2}, ["ipo"], [1.0]),
    ("robust", {"label_smoothing": 0.2}, ["robust"], [1.0]),
    ("rpo", {"nll_coef": 0.7}, ["sigmoid", "sft"], [1.0, 0.7]),
]


@pytest.mark.parametrize("name,over,loss_types,loss_weights", TRL_DPO_CASES, ids=[c[0] for c in TRL_DPO_CASES])
def test_vs_trl_dpo_trainer(name, over, loss_types, loss_weights):
    cfg = PreferenceConfig.preset(name, **over)
    h, w, b, t, _, ref_h, ref_w = make_batch(5)
    rc, rr = ref_sums(ref_h, ref_w, b, t)
    h1, w1, b1 = leaf(h, w, b)
    out = preference_loss(h1, w1, t, config=cfg, ref_chosen_logps=rc, ref_rejected_logps=rr, bias=b1,
                          backend="torch")
    h2, w2, b2 = leaf(h, w, b)
    trl_loss, trl_metrics = trl_dpo_loss(h2, w2, b2, t, rc, rr, loss_types=loss_types,
                                         loss_weights=loss_weights, beta=cfg.beta,
                                         label_smoothing=cfg.label_smoothing)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-9, atol=1e-10)
    for g, g_trl in zip(grads(out.loss, h1, w1, b1), grads(trl_loss, h2, w2, b2)):
        torch.testing.assert_close(g, g_trl, rtol=1e-8, atol=1e-10)
    if not cfg.length_normalize:   # TRL logs beta * sum-log-ratio rewards; ours are the same then
        for ours, theirs in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                             ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                             ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
            assert out.metrics[ours] == pytest.approx(trl_metrics[theirs], rel=1e-9, abs=1e-12)


def _trl_method(cls_name, module, **attrs):
    mod = __import__(module, fromlist=[cls_name])
    cls = getattr(mod, cls_name)
    return cls, SimpleNamespace(accelerator=_accelerator(), **attrs)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cdpo_vs_trl_cpo_sigmoid(eps):
    """TRL's label-smoothed sigmoid (CPOTrainer.cpo_loss, the cDPO form) on the log-ratios."""
    cls, self_ = _trl_method("CPOTrainer", "trl.experimental.cpo.cpo_trainer", alpha=0.0, beta=0.25,
                             loss_type="sigmoid", label_smoothing=eps)
    cfg = PreferenceConfig.preset("cdpo", beta=0.25, label_smoothing=eps)
    h, w, b, t, _, ref_h, ref_w = make_batch(6)
    rc, rr = ref_sums(ref_h, ref_w, b, t)
    h1, = leaf(h)
    out = preference_loss(h1, w, t, config=cfg, ref_chosen_logps=rc, ref_rejected_logps=rr, bias=b,
                          backend="torch")
    h2, = leaf(h)
    lp, _ = ref_token_logps(h2, w, b, t)
    s = lp.sum(-1)
    losses, _, _ = cls.cpo_loss(self_, s[:B] - rc, s[B:] - rr)
    torch.testing.assert_close(out.loss, losses.mean(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads(out.loss, h1)[0], grads(losses.mean(), h2)[0], rtol=1e-8, atol=1e-10)


def test_simpo_vs_trl_cpo_simpo():
    cls, self_ = _trl_method("CPOTrainer", "trl.experimental.cpo.cpo_trainer", alpha=0.0, beta=2.0,
                             loss_type="simpo", label_smoothing=0.0, simpo_gamma=1.0)
    h, w, b, t, _, _, _ = make_batch(7)
    h1, = leaf(h)
    out = preference_loss(h1, w, t, config="simpo", bias=b, backend="torch")
    h2, = leaf(h)
    lp, valid = ref_token_logps(h2, w, b, t)
    avg = lp.sum(-1) / valid.sum(-1)
    losses, rc, rr = cls.cpo_loss(self_, avg[:B], avg[B:])
    torch.testing.assert_close(out.loss, losses.mean(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads(out.loss, h1)[0], grads(losses.mean(), h2)[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.chosen_rewards, rc)
    torch.testing.assert_close(out.rejected_rewards, rr)


def test_orpo_vs_trl_orpo_trainer():
    """ORPOTrainer: loss = NLL(chosen, token mean) - mean(beta * log sigmoid(log odds ratio))."""
    cls, self_ = _trl_method("ORPOTrainer", "trl.experimental.orpo.orpo_trainer", beta=0.1)
    h, w, b, t, _, _, _ = make_batch(8)
    h1, w1 = leaf(h, w)
    out = preference_loss(h1, w1, t, config="orpo", bias=b, backend="torch")
    h2, w2 = leaf(h, w)
    lp, valid = ref_token_logps(h2, w2, b, t)
    avg = lp.sum(-1) / valid.sum(-1)
    losses, rc, rr, log_odds_ratio, log_odds_chosen = cls.odds_ratio_loss(self_, avg[:B], avg[B:])
    nll = -lp[:B].sum() / valid[:B].sum()
    trl_loss = nll - losses.mean()
    torch.testing.assert_close(out.loss.double(), trl_loss.double(), rtol=1e-6, atol=1e-7)  # TRL: .float()
    for g, g_trl in zip(grads(out.loss, h1, w1), grads(trl_loss, h2, w2)):
        torch.testing.assert_close(g, g_trl.double(), rtol=1e-5, atol=1e-7)
    assert out.metrics["log_odds_ratio"] == pytest.approx(float(log_odds_ratio.detach()), rel=1e-6)
    assert out.metrics["log_odds_chosen"] == pytest.approx(float(log_odds_chosen.detach()), rel=1e-6)


# ---------------------------------------------------------------------------------------------- Liger
def _liger_case(seed=9):
    h, w, b, t, _, ref_h, ref_w = make_batch(seed, torch.float32)
    return h, w, b, t, ref_h.float(), ref_w.float()


LIGER_DPO_CASES = [("dpo", {}, dict(loss_type="sigmoid")),
                   ("hinge", {"beta": 0.4}, dict(loss_type="hinge")),
                   ("robust", {"label_smoothing": 0.1}, dict(loss_type="robust", label_smoothing=0.1)),
                   ("rpo", {"nll_coef": 0.5}, dict(loss_type="sigmoid", compute_nll_loss=True, alpha=0.5))]


@pytest.mark.parametrize("name,over,liger_kw", LIGER_DPO_CASES, ids=[c[0] for c in LIGER_DPO_CASES])
def test_vs_liger_fused_linear_dpo(name, over, liger_kw):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    cfg = PreferenceConfig.preset(name, **over)
    h, w, b, t, ref_h, ref_w = _liger_case()
    with torch.no_grad():
        rc_rr = sequence_logprobs(ref_h, ref_w, t, bias=b, backend="torch")
    h1, w1, b1 = leaf(h, w, b)
    out = preference_loss(h1, w1, t, config=cfg, ref_chosen_logps=rc_rr[:B], ref_rejected_logps=rc_rr[B:],
                          bias=b1, backend="torch")
    h2, w2, b2 = leaf(h, w, b)
    mod = chunked.LigerFusedLinearDPOLoss(beta=cfg.beta, compiled=False, use_ref_model=True, **liger_kw)
    liger_loss, aux = mod(w2, h2, t, b2, ref_input=ref_h, ref_weight=ref_w, ref_bias=b)
    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps, aux[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps, aux[1], rtol=1e-5, atol=1e-5)
    for g, g_l in zip(grads(out.loss, h1, w1, b1), grads(liger_loss, h2, w2, b2)):
        torch.testing.assert_close(g, g_l, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_vs_liger_fused_linear_simpo_orpo(kind):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    h, w, b, t, _, _ = _liger_case(10)
    if kind == "simpo":
        cfg = PreferenceConfig.preset("simpo", beta=2.5, gamma=1.2, label_smoothing=0.05, nll_coef=0.3)
        mod = chunked.LigerFusedLinearSimPOLoss(beta=2.5, gamma=1.2, label_smoothing=0.05, alpha=0.3,
                                                compute_nll_loss=True, compiled=False)
    else:
        cfg = PreferenceConfig.preset("orpo", beta=0.2)
        mod = chunked.LigerFusedLinearORPOLoss(beta=0.2, compute_nll_loss=True, compiled=False)
    h1, w1, b1 = leaf(h, w, b)
    out = preference_loss(h1, w1, t, config=cfg, bias=b1, backend="torch")
    h2, w2, b2 = leaf(h, w, b)
    liger_loss, aux = mod(w2, h2, t, b2)
    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps, aux[0], rtol=1e-5, atol=1e-6)   # per-token means
    torch.testing.assert_close(out.metrics["nll"], float(aux[4]), rtol=1e-5, atol=1e-6)
    for g, g_l in zip(grads(out.loss, h1, w1, b1), grads(liger_loss, h2, w2, b2)):
        torch.testing.assert_close(g, g_l, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- config
def test_config_presets_and_overrides():
    assert PreferenceConfig.preset("dpo", beta=0.3).beta == 0.3
    assert PreferenceConfig.preset("simpo").use_reference is False
    assert PreferenceConfig.preset("cdpo").replace(label_smoothing=0.2).label_smoothing == 0.2
    with pytest.raises(ValueError, match="unknown PreferenceConfig field"):
        PreferenceConfig.preset("dpo", rpo_alpha=1.0)
    with pytest.raises(ValueError, match="unknown preference preset"):
        PreferenceConfig.preset("kto")
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceConfig(loss_type="exo")
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        PreferenceConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="use_reference=False"):
        PreferenceConfig(loss_type="orpo", length_normalize=True)
    with pytest.raises(ValueError, match="gamma"):
        PreferenceConfig(loss_type="ipo", gamma=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="bool"):
        PreferenceConfig(use_reference=1)
    with pytest.raises(Exception):
        PreferenceConfig().beta = 1.0          # frozen


def test_bad_input_errors():
    h, w, b, t, m, ref_h, ref_w = make_batch(11, torch.float32)
    rc, rr = torch.zeros(B), torch.zeros(B)
    with pytest.raises(ValueError, match="even"):
        preference_loss(h[:5], w, t[:5], config="simpo", backend="torch")
    with pytest.raises(ValueError, match="targets must have shape"):
        preference_loss(h, w, t[:, :-1], config="simpo", backend="torch")
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        preference_loss(h[0], w, t[0], config="simpo", backend="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        preference_loss(h, w[:, :-1], t, config="simpo", backend="torch")
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        preference_loss(h, w, t, config="dpo", backend="torch")
    with pytest.raises(ValueError, match="ref_rejected_logps is required"):
        preference_loss(h, w, t, config="dpo", ref_chosen_logps=rc, backend="torch")
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[B=3\]"):
        preference_loss(h, w, t, config="dpo", ref_chosen_logps=torch.zeros(2 * B), ref_rejected_logps=rr,
                        backend="torch")
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss(h, w, t, config="simpo", ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch")
    with pytest.raises(ValueError, match="loss_mask must have shape"):
        preference_loss(h, w, t, config="simpo", loss_mask=torch.ones(2 * B, T + 1, dtype=torch.bool),
                        backend="torch")
    t_empty = t.clone()
    t_empty[4] = -100
    with pytest.raises(ValueError, match=r"rows \[4\].*no valid target"):
        preference_loss(h, w, t_empty, config="simpo", backend="torch")
    with pytest.raises(TypeError, match="config"):
        preference_loss(h, w, t, config={"beta": 0.1}, backend="torch")


def test_docs_table_matches_presets():
    text = (ROOT / "docs" / "losses.md").read_text()
    lines = text.split("### Preference presets", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[1:1 + len(PREFERENCE_COLUMNS)] == list(PREFERENCE_COLUMNS)
    rows = {}
    for line in table[2:]:
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:1 + len(PREFERENCE_COLUMNS)]
    assert set(rows) == set(PREFERENCE_PRESETS)
    for name, row in PREFERENCE_PRESETS.items():
        assert rows[name] == [str(row[c]) for c in PREFERENCE_COLUMNS], name


def test_public_api():
    for n in ("PreferenceConfig", "PREFERENCE_PRESETS", "preference_loss", "sequence_logprobs",
              "pairwise_reward_loss", "gae", "value_loss", "kl_penalty_rewards", "AdaptiveKLController",
              "FixedKLController", "whiten", "PreferenceOutput"):
        assert n in upg_kernels.__all__ and hasattr(upg_kernels, n)
