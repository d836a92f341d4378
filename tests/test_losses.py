"""unified_policy_loss: every preset against the independent float64 reference, mixed-batch
additivity, equal-reward groups, exact kernel skipping, NaN hygiene, bad input, docs/table agreement."""
import math
import pathlib

import pytest
import torch

import upg_kernels
from upg_kernels import LossConfig, UnifiedPolicyLoss, token_logprobs_reference, unified_policy_loss
from upg_kernels.losses import PRESETS
from upg_kernels.losses.reference import unified_policy_loss_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, T, H, V = 6, 5, 12, 19
ALL_PRESETS = sorted(PRESETS)


# ----------------------------------------------------------------------------------------- cases
def make_case(name, seed=0, *, dtype=torch.float32, flat=False, overrides=None, with_bias=True):
    """A batch for preset ``name``: (config, hidden, weight, bias, targets, kwargs).

    Ratios r = exp(logp - old) are placed away from every clip boundary so float32 and float64
    take the same branch; one group has equal rewards; one row is fully masked; some targets are
    ignore_index; masked positions of old/ref/rollout hold NaN (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    overrides = dict(overrides or {})
    cfg0 = LossConfig.preset(name)
    if cfg0.aggregation == "seq_mean_token_sum_norm" or cfg0.demo_aggregation == "seq_mean_token_sum_norm":
        overrides.setdefault("max_completion_length", 2 * T)
    cfg = LossConfig.preset(name, **overrides)
    hid = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.7)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.2 if with_bias else None
    tgt = torch.randint(0, V, (B, T), generator=g)
    tgt[0, 4] = -100
    tgt[3, 0] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, :] = False
    mask[5, 2] = False
    hid, w = hid.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    lp64 = token_logprobs_reference(hid.double(), w.double(), tgt, bias=None if b is None else b.double())
    kw = dict(loss_mask=mask)
    valid = mask & (tgt != -100)
    if cfg.reference == "old":
        if cfg.ratio_level == "sequence":
            per_row = torch.tensor([math.log(0.5), 0.0, math.log(1.0001), math.log(2.0), 0.0, -1e-4],
                                   dtype=torch.float64)
            logr = per_row[:, None].expand(B, T)
        else:
            choices = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.25, 1.6, 6.0], dtype=torch.float64).log()
            logr = choices[torch.randint(0, len(choices), (B, T), generator=g)]
        old = (lp64 - logr)
        old = torch.where(valid, old, torch.full_like(old, float("nan")))
        kw["old_logprobs"] = old.to(torch.float32 if dtype != torch.float64 else dtype)
    if cfg.likelihood in ("chi2", "hellinger") or cfg.kl_coef > 0:
        ref = lp64 + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
        kw["ref_logprobs"] = torch.where(valid, ref, torch.full_like(ref, float("nan")))
    if cfg.rollout_is is not None:
        base = kw.get("old_logprobs", lp64.to(torch.float32))
        rol = torch.where(valid, base.double() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
                          torch.full((B, T), float("nan"), dtype=torch.float64))
        kw["rollout_logprobs"] = rol
    if cfg.advantage == "given":
        kw["advantages"] = torch.randn(B, T, generator=g, dtype=torch.float64) if name == "ppo" \
            else torch.randn(B, generator=g, dtype=torch.float64)
    elif cfg.advantage != "one":
        if cfg.demo_part is not None:
            kw["is_demo"] = torch.tensor([False, False, True, False, False, True])
            kw["rewards"] = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
            kw["group_ids"] = torch.tensor([7, 7, 9, 3, 3, 9])   # {0,1} mixed, {3,4} equal, demos {2,5}
        else:
            kw["rewards"] = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64)
            kw["group_size"] = 3                                  # second group: equal rewards
    if flat:
        hid = hid.reshape(B * T, H)
        tgt = tgt.reshape(B * T)
        for k in ("loss_mask", "old_logprobs", "ref_logprobs", "rollout_logprobs"):
            if k in kw:
                kw[k] = kw[k].reshape(B * T)
        for k in ("rewards", "is_demo", "group_ids"):
            if k in kw:
                kw[k] = kw[k].repeat_interleave(T)
        if "group_size" in kw:
            kw["group_size"] = kw["group_size"] * T
        if "advantages" in kw:
            a = kw["advantages"]
            kw["advantages"] = (a if a.dim() == 2 else a[:, None].expand(B, T)).reshape(B * T)
    return cfg, hid, w, b, tgt, kw


_call_extra = {}


def run_ours(cfg, hid, w, b, tgt, kw, backend="torch", device="cpu"):
    """Our loss and gradients (on ``device``; results come back to the CPU)."""
    h = hid.clone().to(device).requires_grad_(True)
    ww = w.clone().to(device).requires_grad_(True)
    bb = None if b is None else b.clone().to(device).requires_grad_(True)
    kw2 = {k: (v.to(hid.dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
               and k not in ("rewards",) else v) for k, v in kw.items()}
    kw2 = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw2.items()}
    out = unified_policy_loss(h, ww, tgt.to(device), config=cfg, bias=bb, backend=backend, **kw2,
                              **_call_extra)
    out.loss.backward()
    if device != "cpu":
        out.loss = out.loss.detach().cpu()
        for k in ("logprobs", "entropy", "coef_logp", "coef_entropy"):
            setattr(out, k, getattr(out, k).cpu())
    return out, h.grad.cpu(), ww.grad.cpu(), None if bb is None else bb.grad.cpu()


def run_ref(cfg, hid, w, b, tgt, kw):
    h = hid.double().clone().requires_grad_(True)
    ww = w.double().clone().requires_grad_(True)
    bb = None if b is None else b.double().clone().requires_grad_(True)
    kw2 = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
           for k, v in kw.items()}
    loss, m, lp, ent, coef = unified_policy_loss_reference(h, ww, tgt, config=cfg, bias=bb, **kw2,
                                                           **_call_extra)
    loss.backward()
    return loss, m, lp, ent, coef, h.grad, ww.grad, None if bb is None else bb.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def check_against_reference(name, *, dtype, tol_loss, tol_grad, tol_metric, flat=False, backend="torch",
                            overrides=None, seed=0, device="cpu"):
    cfg, hid, w, b, tgt, kw = make_case(name, seed, dtype=dtype, flat=flat, overrides=overrides)
    out, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw, backend, device)
    loss_r, m_r, lp_r, ent_r, coef_r, gh_r, gw_r, gb_r = run_ref(cfg, hid, w, b, tgt, kw)
    errs = {}
    errs["loss"] = abs(out.loss.item() - loss_r.item()) / max(1.0, abs(loss_r.item()))
    assert errs["loss"] < tol_loss, (name, out.loss.item(), loss_r.item())
    for nm, a, r in (("hidden", gh, gh_r), ("weight", gw, gw_r), ("bias", gb, gb_r)):
        assert a is not None and torch.isfinite(a).all(), (name, nm)
        if float(r.abs().max()) == 0:
            assert float(a.abs().max()) == 0, (name, nm)
            continue
        errs[nm] = rel_err(a, r)
        assert errs[nm] < tol_grad, (name, nm, errs[nm])
    assert set(m_r) <= set(out.metrics), set(m_r) - set(out.metrics)
    for k, v in m_r.items():
        assert abs(out.metrics[k] - v) <= tol_metric * max(1.0, abs(v)), (name, k, out.metrics[k], v)
    sh = tgt.shape
    assert out.logprobs.shape == sh and out.entropy.shape == sh and out.coef_logp.shape == sh
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    # the coefficient pattern: exactly the reference's zeros (float64 decides the same branches)
    if dtype == torch.float64:
        assert torch.equal(out.coef_logp == 0, coef_r == 0), name
    return errs


# ----------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_float32_vs_reference(name):
    check_against_reference(name, dtype=torch.float32, tol_loss=2e-5, tol_grad=2e-4, tol_metric=2e-5)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_float64_vs_reference(name):
    check_against_reference(name, dtype=torch.float64, tol_loss=1e-11, tol_grad=1e-9, tol_metric=1e-11)


EXTRA_CONFIGS = [
    ("grpo", dict(kl_coef=0.05, kl_type="k3", entropy_coef=0.01)),
    ("grpo", dict(kl_coef=0.05, kl_type="k1")),
    ("bnpo", dict(kl_coef=0.1, kl_type="k2")),
    ("ppo", dict(dual_clip=3.0)),
    ("ppo", dict(delta=1.3)),
    ("dapo", dict(rollout_is="token_truncate", rollout_is_cap=1.5)),
    ("dapo", dict(rollout_is="token_mask", rollout_is_cap=1.5)),
    ("grpo", dict(rollout_is="sequence_truncate", rollout_is_cap=1.5)),
    ("grpo", dict(rollout_is="sequence_mask", rollout_is_cap=1.5)),
    ("reinforce", dict(reference="one")),
    ("reinforce", dict(reference="shaped")),
    ("grpo", dict(advantage="mean")),
    ("grpo", dict(advantage="rloo")),
    ("grpo", dict(advantage="batch_std")),
    ("grpo", dict(stabilization="none")),
    ("grpo", dict(ratio_level="sequence", stabilization="none")),
    ("sft", dict(aggregation="seq_mean_token_mean")),
    ("sft", dict(aggregation="seq_mean_token_sum")),
    ("hpt", dict(demo_aggregation="seq_mean_token_mean", demo_coef=0.3, rl_coef=0.7)),
    ("chi2_sft", dict(fdiv_beta=1.0)),
    ("hellinger_sft", dict(fdiv_beta=1.0)),   # u above the 1/2 cap on some tokens
    ("hpt_release", dict(entropy_coef=0.05)),
    # bias-corrected KL (TRL/Liger use_bias_correction_kl): token and sequence ratio, delta, k2
    ("grpo", dict(kl_coef=0.05, kl_bias_correction=True)),
    ("gspo", dict(kl_coef=0.05, kl_bias_correction=True)),
    ("dapo", dict(kl_coef=0.1, kl_type="k2", kl_bias_correction=True, delta=1.3)),
    ("cispo", dict(kl_coef=0.05, kl_bias_correction=True, rollout_is="token_truncate")),
    ("luspo", dict(kl_coef=0.05, kl_bias_correction=True)),
    ("luspo", dict(ratio_level="token", stabilization="clip")),
    ("vespo", dict(kl_coef=0.05, kl_bias_correction=True)),
    ("vespo", dict(rollout_is="token_truncate", rollout_is_cap=1.5)),
    ("vespo", dict(rollout_is="token_mask", rollout_is_cap=1.5)),
    ("vespo", dict(vespo_k_pos=0.5, vespo_lambda_pos=0.7, vespo_k_neg=1.0, vespo_lambda_neg=5.0)),
]


@pytest.mark.parametrize("name,overrides", EXTRA_CONFIGS, ids=lambda x: str(x))
def test_config_variants_vs_reference(name, overrides):
    check_against_reference(name, dtype=torch.float64, tol_loss=1e-11, tol_grad=1e-9, tol_metric=1e-11,
                            overrides=overrides)
    check_against_reference(name, dtype=torch.float32, tol_loss=2e-5, tol_grad=2e-4, tol_metric=2e-5,
                            overrides=overrides, seed=1)


@pytest.mark.parametrize("name", ["sft", "grpo", "ppo", "hpt", "cispo"])
def test_flat_input_vs_reference(name):
    check_against_reference(name, dtype=torch.float64, tol_loss=1e-11, tol_grad=1e-9, tol_metric=1e-11,
                            flat=True)


def test_flat_input_is_n_sequences_of_length_one():
    cfg, hid, w, b, tgt, kw = make_case("sft", 3, dtype=torch.float64)
    N = B * T
    a = unified_policy_loss(hid.reshape(N, H), w, tgt.reshape(N), config="grpo",
                            advantages=torch.linspace(-1, 1, N, dtype=torch.float64), bias=b)
    c = unified_policy_loss(hid.reshape(N, 1, H), w, tgt.reshape(N, 1), config="grpo",
                            advantages=torch.linspace(-1, 1, N, dtype=torch.float64), bias=b)
    assert a.loss.item() == pytest.approx(c.loss.item(), rel=1e-14)
    assert a.logprobs.shape == (N,)


# ----------------------------------------------------------------------------------------- Triton
TRITON_SUBSET = ["sft", "grpo", "hpt", "gspo"]


@pytest.mark.parametrize("name", TRITON_SUBSET)
def test_preset_triton_backend_vs_reference(name):
    pytest.importorskip("triton")
    # CUDA tensors where there is a GPU, else the CPU under TRITON_INTERPRET=1 (tests/conftest.py)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_against_reference(name, dtype=torch.float32, tol_loss=2e-5, tol_grad=5e-4, tol_metric=2e-5,
                            backend="triton", device=device)


# ----------------------------------------------------------------------------------------- mixed batches
def _split_kwargs(kw, rows):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B:
            out[k] = v[rows]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("name", ["hpt", "hpt_release", "luffy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_batch_equals_sum_of_parts(name, dtype):
    cfg, hid, w, b, tgt, kw = make_case(name, 5, dtype=dtype)
    # the per-row advantages the mixed batch computes, handed to all three calls
    adv = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw)
    kw = dict(kw)
    rewards, gids = kw.pop("rewards"), kw.pop("group_ids")
    from upg_kernels import group_advantages
    demo = kw["is_demo"]
    a = torch.zeros(B, dtype=torch.float64)
    sel = ~demo if cfg.demo_part == "sft" else torch.ones(B, dtype=torch.bool)
    a[sel] = group_advantages(rewards[sel], group_ids=gids[sel], mode=cfg.advantage).double()
    kw["advantages"] = a.to(dtype)
    whole = run_ours(cfg, hid, w, b, tgt, kw)
    assert whole[0].loss.item() == pytest.approx(adv.loss.item(), rel=1e-6, abs=1e-7)
    main = (~demo).nonzero().squeeze(1)
    dem = demo.nonzero().squeeze(1)
    p1 = run_ours(cfg, hid[main], w, b, tgt[main], _split_kwargs(kw, main))
    p2 = run_ours(cfg, hid[dem], w, b, tgt[dem], _split_kwargs(kw, dem))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert abs(whole[0].loss.item() - p1[0].loss.item() - p2[0].loss.item()) < tol * 10
    gh = torch.zeros_like(whole[1])
    gh[main] = p1[1]
    gh[dem] = p2[1]
    assert rel_err(whole[1], gh) < tol
    assert rel_err(whole[2], p1[2] + p2[2]) < tol
    assert rel_err(whole[3], p1[3] + p2[3]) < tol
    m = whole[0].metrics
    assert m["demo_rows"] == 2 and m["rollout_rows"] == 4
    assert m["sft_share"] == pytest.approx(2 / 6)
    assert m["demo_tokens"] == p2[0].metrics["demo_tokens"]
    assert m["rollout_tokens"] == p1[0].metrics["rollout_tokens"]


def test_hpt_demo_rows_are_token_mean_nll():
    cfg, hid, w, b, tgt, kw = make_case("hpt", 2, dtype=torch.float64)
    kw = {k: v for k, v in kw.items() if k not in ("rewards", "group_ids", "old_logprobs")}
    kw["is_demo"] = torch.ones(B, dtype=torch.bool)
    out = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw)
    sft = unified_policy_loss(hid, w, tgt, config="sft", bias=b, loss_mask=kw["loss_mask"])
    assert out.loss.item() == pytest.approx(sft.loss.item(), rel=1e-13)


# ----------------------------------------------------------------------------------------- zero coefficients
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_equal_reward_groups_have_exactly_zero_coefficients(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hid = torch.randn(B, T, H, device=dev, requires_grad=True)
    w = torch.randn(V, H, device=dev, requires_grad=True)
    tgt = torch.randint(0, V, (B, T), device=dev)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], device=dev)
    out = unified_policy_loss(hid, w, tgt, config="grpo", rewards=rewards, group_size=3, backend=backend)
    out.loss.backward()
    assert torch.equal(out.coef_logp[:3].cpu(), torch.zeros(3, T))
    assert bool((out.coef_logp[3:] != 0).all())
    assert torch.equal(hid.grad[:3].cpu(), torch.zeros(3, T, H))
    assert out.metrics["zero_coef_frac"] == pytest.approx(0.5)
    assert math.isfinite(out.loss.item())


def test_clipped_and_masked_tokens_skip_the_kernel(monkeypatch):
    """The backend backward receives exactly-zero coefficients for clipped/masked/equal-group
    tokens, and the result equals the gradient of the batch without those rows."""
    from upg_kernels.kernels import torch_chunked
    seen = {}
    orig = torch_chunked.backward

    def spy(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p, *a, **k):
        seen["g_logp"] = g_logp.clone()
        seen["g_ent"] = None if g_ent is None else g_ent.clone()
        res = orig(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p, *a, **k)
        # the same backward over only the rows with a nonzero coefficient
        nz = (g_logp != 0) if g_ent is None else ((g_logp != 0) | (g_ent != 0))
        sub = orig(hidden[nz], weight, bias, targets[nz], lse[nz], ent[nz], g_logp[nz],
                   None if g_ent is None else g_ent[nz], p, *a, **k)
        seen["same_as_subset"] = torch.equal(res[1], sub[1]) and torch.equal(res[0][nz], sub[0])
        return res

    monkeypatch.setattr(torch_chunked, "backward", spy)
    cfg, hid, w, b, tgt, kw = make_case("bnpo", 4, dtype=torch.float32)
    out, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw)
    g = seen["g_logp"].reshape(B, T)
    assert seen["g_ent"] is None or not bool(seen["g_ent"].any())   # no entropy term
    assert torch.equal(g == 0, out.coef_logp == 0)
    zero = g == 0
    valid = kw["loss_mask"] & (tgt != -100)
    assert bool(zero[~valid].all())                    # masked tokens
    assert bool(zero[3:].all())                        # the equal-reward group
    r = (out.logprobs.double() - kw["old_logprobs"].double()).exp()
    clipped = valid & (((r > 1.2) & (out.coef_logp == 0)) | ((r < 0.8) & (out.coef_logp == 0)))
    assert bool(clipped.any())                         # some tokens are clipped ...
    assert bool(zero[clipped].all())                   # ... and skipped
    assert out.metrics["zero_coef_frac"] == pytest.approx(float((zero & valid).sum() / valid.sum()))
    assert torch.equal(gh[zero], torch.zeros_like(gh[zero]))
    # bitwise the same gradients as a backward over the nonzero rows alone
    assert seen["same_as_subset"]


def test_nan_in_masked_positions_does_not_poison():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 6, dtype=torch.float32, overrides=dict(kl_coef=0.1))
    assert torch.isnan(kw["old_logprobs"]).any() and torch.isnan(kw["ref_logprobs"]).any()
    out, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw)
    assert math.isfinite(out.loss.item())
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
    clean = dict(kw)
    for k in ("old_logprobs", "ref_logprobs"):
        clean[k] = torch.nan_to_num(kw[k], nan=-3.0)
    out2, gh2, gw2, gb2 = run_ours(cfg, hid, w, b, tgt, clean)
    assert out.loss.item() == out2.loss.item()
    assert torch.equal(gh, gh2) and torch.equal(gw, gw2)
    # a NaN advantage of a masked token ([B, T] advantages) is harmless too
    adv = torch.randn(B, T)
    adv[1, 4] = float("nan")
    o3 = unified_policy_loss(hid, w, tgt, config="ppo", advantages=adv, loss_mask=kw["loss_mask"],
                             old_logprobs=clean["old_logprobs"])
    assert math.isfinite(o3.loss.item())


def test_on_policy_default_and_no_grad():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 7)
    kw.pop("old_logprobs")
    with torch.no_grad():
        out = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw)
    assert not out.loss.requires_grad
    assert out.metrics["ratio_mean"] == 1.0 and out.metrics["clip_frac"] == 0.0
    # on-policy GRPO: gradient = -A grad logp averaged like the aggregation (REINFORCE-like)
    out2, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw)
    _, m, *_rest, gh_r, gw_r, gb_r = run_ref(cfg, hid, w, b, tgt, kw)
    assert rel_err(gh, gh_r) < 2e-4


def test_module_form():
    cfg, hid, w, b, tgt, kw = make_case("dapo", 8)
    mod = UnifiedPolicyLoss("dapo", backend="torch")
    a = mod(hid, w, tgt, bias=b, **kw)
    c = unified_policy_loss(hid, w, tgt, config=LossConfig.preset("dapo"), bias=b, backend="torch", **kw)
    assert a.loss.item() == c.loss.item()
    mod2 = UnifiedPolicyLoss(LossConfig.preset("dapo"), eps_high=0.2)
    assert mod2.config.eps_high == 0.2
    assert "eps_high=0.2" in repr(mod2)
    with pytest.raises(ValueError, match="unknown LossConfig field"):
        UnifiedPolicyLoss("dapo", epsilon=0.1)
    assert upg_kernels.LossOutput is type(a)


def test_num_items_in_batch_normalizes_token_mean():
    cfg, hid, w, b, tgt, kw = make_case("dapo", 9, dtype=torch.float64)
    a = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw)
    c = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, num_items_in_batch=100, **kw)
    n = a.metrics["rollout_tokens"]
    assert c.loss.item() == pytest.approx(a.loss.item() * n / 100, rel=1e-12)


def test_liger_grpo_loss_semantics():
    """Our configs reproduce Liger 0.8's loss for every loss type from the same log-probs."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction as F
    torch.manual_seed(0)
    hid = torch.randn(B, T, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * 0.5
    tgt = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    lp = token_logprobs_reference(hid, w, tgt)
    old = lp + 0.3 * torch.randn(B, T, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    cases = [("grpo", "token", {}), ("bnpo", "token", {}), ("dr_grpo", "token", {}),
             ("dapo", "token", {}), ("cispo", "token", {}), ("sapo", "token", {}),
             ("grpo", "sequence", {}), ("dapo", "token", {"delta": 1.2}),
             ("bnpo", "sequence", {}), ("dr_grpo", "sequence", {})]
    vllm = (0.5 + torch.rand(B, T, dtype=torch.float64))
    for k, (loss_type, level, extra) in enumerate(cases):
        eh = 5.0 if loss_type == "cispo" else 0.28
        isr = vllm if k % 2 else None
        lp_leaf = lp.clone().requires_grad_(True)
        ll, metrics = F.ppo_loss_fn(lp_leaf, mask, adv, mask, ref_per_token_logps=ref,
                                    old_per_token_logps=old, epsilon_low=0.2, epsilon_high=eh, beta=0.04,
                                    loss_type=loss_type, max_completion_length=8,
                                    importance_sampling_level=level, vllm_is_ratio=isr, **extra)
        cfg = LossConfig.preset(loss_type if loss_type != "grpo" or level == "token" else "grpo",
                                eps_low=0.2, eps_high=eh, kl_coef=0.04, kl_type="k3",
                                max_completion_length=8, ratio_level=level, **extra)
        hh = hid.clone().requires_grad_(True)
        ours = unified_policy_loss(hh, w, tgt, config=cfg, loss_mask=mask, advantages=adv,
                                   old_logprobs=old, ref_logprobs=ref, is_ratio=isr)
        assert float(ours.loss.detach()) == pytest.approx(float(ll.detach()), rel=1e-10, abs=1e-12), loss_type
        g_liger = torch.autograd.grad(ll, lp_leaf)[0]
        assert torch.allclose(-ours.coef_logp, g_liger, rtol=1e-9, atol=1e-12), loss_type
        assert ours.metrics["kl_mean"] == pytest.approx(float(metrics[0].detach()), rel=1e-6)
        assert ours.metrics["clip_frac"] == pytest.approx(float(metrics[1].detach()), rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------------------- config
def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*grpo"):
        LossConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown LossConfig field.*epsilon.*valid fields"):
        LossConfig.preset("grpo", epsilon=0.2)
    with pytest.raises(ValueError, match="unknown preset"):
        unified_policy_loss(torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long),
                            config="grpoo")


@pytest.mark.parametrize("kw,match", [
    (dict(stabilization="clipp"), "stabilization must be one of"),
    (dict(reference="pi"), "reference must be one of"),
    (dict(advantage="z"), "advantage must be one of"),
    (dict(likelihood="kl"), "likelihood must be one of"),
    (dict(aggregation="mean"), "aggregation must be one of"),
    (dict(kl_type="k4"), "kl_type must be one of"),
    (dict(rollout_is="token"), "rollout_is must be one of"),
    (dict(demo_part="rl"), "demo_part must be one of"),
    (dict(eps_low=-0.1), "eps_low must be >= 0"),
    (dict(eps_low=1.0, stabilization="clip", reference="old"), "eps_low must be < 1"),
    (dict(tau_pos=0.0), "tau_pos must be > 0"),
    (dict(kl_coef=float("nan")), "kl_coef must be a finite number"),
    (dict(stabilization="clip"), "needs reference='old'"),
    (dict(stabilization="sapo", reference="old", ratio_level="sequence"), "not supported"),
    (dict(likelihood="dft", reference="old"), "needs reference='current'"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(stabilization="vespo", reference="old", ratio_level="sequence"), "not supported"),
    (dict(stabilization="vespo", reference="old", rollout_is="sequence_truncate"), "vespo.*token_truncate"),
    (dict(stabilization="vespo", reference="old", vespo_lambda_pos=0.0), "vespo_lambda_pos must be > 0"),
    (dict(stabilization="vespo", reference="old", vespo_k_neg=-1.0), "vespo_k_neg must be >= 0"),
    (dict(vespo_k_pos=float("inf")), "vespo_k_pos must be a finite number"),
    (dict(kl_bias_correction=1), "kl_bias_correction must be a bool"),
    (dict(kl_bias_correction=True, kl_coef=0.1), "kl_bias_correction.*needs reference='old'"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)


def test_seq_clip_implies_sequence_ratio():
    assert LossConfig.preset("gspo").ratio_level == "sequence"
    assert LossConfig(stabilization="seq_clip", reference="old").ratio_level == "sequence"


# ----------------------------------------------------------------------------------------- bad input
def _small():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 11)
    kw.pop("rewards")
    kw.pop("group_size")
    return hid, w, tgt, kw


@pytest.mark.parametrize("bad,match", [
    (dict(advantages=torch.zeros(B + 1)), "advantages must have shape"),
    (dict(advantages=torch.zeros(B, T + 1)), "advantages must have shape"),
    (dict(rewards=torch.zeros(B)), "rewards needs group_size or group_ids"),
    (dict(rewards=torch.zeros(B), group_size=4), "group_size=4 does not divide"),
    (dict(rewards=torch.zeros(B + 1), group_size=1), "rewards must have shape"),
    (dict(rewards=torch.zeros(B), group_ids=torch.zeros(B - 1, dtype=torch.long)), "group_ids must have shape"),
    (dict(advantages=torch.zeros(B), is_demo=torch.zeros(B + 1, dtype=torch.bool)), "is_demo must have shape"),
    (dict(advantages=torch.zeros(B), is_demo=torch.ones(B, dtype=torch.bool)), "demo_part is None"),
    (dict(advantages=torch.zeros(B), loss_mask=torch.ones(B, T + 1)), "loss_mask must have shape"),
    (dict(advantages=torch.zeros(B), old_logprobs=torch.zeros(T, B)), "old_logprobs must have shape"),
    (dict(advantages=torch.zeros(B), rewards=torch.zeros(B), group_size=2), "not both"),
    (dict(), "needs advantages, or rewards"),
])
def test_bad_input_raises_clear_errors(bad, match):
    hid, w, tgt, kw = _small()
    kw = {k: v for k, v in kw.items() if k == "old_logprobs"}
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        unified_policy_loss(hid, w, tgt, config="grpo", **kw)


def test_bad_input_other_parts():
    hid, w, tgt, _ = _small()
    with pytest.raises(ValueError, match="takes no advantages"):
        unified_policy_loss(hid, w, tgt, config="sft", advantages=torch.zeros(B))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        unified_policy_loss(hid, w, tgt, config="chi2_sft")
    with pytest.raises(ValueError, match="needs rollout_logprobs"):
        unified_policy_loss(hid, w, tgt, config=LossConfig.preset("grpo", rollout_is="token_truncate"),
                            advantages=torch.zeros(B))
    with pytest.raises(ValueError, match="max_completion_length"):
        unified_policy_loss(hid, w, tgt, config="dr_grpo", advantages=torch.zeros(B))
    with pytest.raises(ValueError, match="takes advantages, not rewards"):
        unified_policy_loss(hid, w, tgt, config="ppo", rewards=torch.zeros(B), group_size=2)
    with pytest.raises(ValueError, match="targets must have shape"):
        unified_policy_loss(hid, w, tgt[:, :-1], config="sft")
    with pytest.raises(ValueError, match="hidden must have shape"):
        unified_policy_loss(hid[None], w, tgt, config="sft")
    with pytest.raises(TypeError, match="config must be"):
        unified_policy_loss(hid, w, tgt, config=3)
    # a KL coefficient without reference log-probs would silently add kl_coef * logp (k1) or nothing
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        unified_policy_loss(hid, w, tgt, config=LossConfig.preset("grpo", kl_coef=0.1),
                            advantages=torch.zeros(B))
    with pytest.raises(TypeError, match="old_logprobs must be a floating tensor"):
        unified_policy_loss(hid, w, tgt, config="grpo", advantages=torch.zeros(B),
                            old_logprobs=torch.zeros(B, T, dtype=torch.long))


@pytest.mark.parametrize("preset", ["grpo", "gspo", "sft"])
def test_empty_batch_gives_zero_loss_and_defined_metrics(preset):
    hid, w = torch.randn(0, T, 8, requires_grad=True), torch.randn(11, 8)
    tgt = torch.zeros(0, T, dtype=torch.long)
    kw = {} if preset == "sft" else dict(advantages=torch.zeros(0))
    out = unified_policy_loss(hid, w, tgt, config=preset, **kw)
    assert out.loss.item() == 0.0 and out.metrics["ratio_min"] == 1.0 == out.metrics["ratio_max"]
    out.loss.backward()
    assert hid.grad.shape == hid.shape


# ----------------------------------------------------------------------------------------- docs
def _docs_table():
    text = (ROOT / "docs" / "losses.md").read_text()
    start = text.index("<!-- presets:begin -->")
    end = text.index("<!-- presets:end -->")
    rows = {}
    for line in text[start:end].splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] in ("preset", "") or set(cells[0]) <= set("-: "):
            continue
        rows[cells[0]] = cells
    return rows


def test_docs_preset_table_matches_code():
    from upg_kernels.losses.config import PRESET_COLUMNS
    rows = _docs_table()
    assert set(rows) == set(PRESETS), set(rows) ^ set(PRESETS)
    for name, cells in rows.items():
        cfg = LossConfig.preset(name)
        want = [getattr(cfg, c) for c in PRESET_COLUMNS] + [cfg.demo_part or "-"]
        assert cells[1:1 + len(want)] == [str(x) for x in want], (name, cells, want)
        # the "other settings" column lists every non-default field of the row
        extras = {k: v for k, v in PRESETS[name].items()
                  if k not in PRESET_COLUMNS and k not in ("description", "demo_part")}
        for k, v in extras.items():
            assert f"{k}={v}" in cells[1 + len(want)], (name, k, cells)


def test_demo_rows_without_sampler_logprobs_do_not_poison():
    """Demonstrations have no old/ref/rollout log-probs: NaN there must not reach the loss."""
    cfg, hid, w, b, tgt, kw = make_case("hpt", 12, overrides=dict(kl_coef=0.1, rollout_is="token_truncate"))
    demo = kw["is_demo"]
    clean = dict(kw)
    for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        clean[k] = torch.nan_to_num(kw[k], nan=-2.0)
    dirty = dict(clean)
    for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        x = clean[k].clone()
        x[demo] = float("nan")
        dirty[k] = x
    o1, gh1, gw1, gb1 = run_ours(cfg, hid, w, b, tgt, clean)
    o2, gh2, gw2, gb2 = run_ours(cfg, hid, w, b, tgt, dirty)
    assert math.isfinite(o2.loss.item()) and o1.loss.item() == o2.loss.item()
    assert torch.equal(gh1, gh2) and torch.equal(gw1, gw2) and torch.equal(gb1, gb2)
    # NaN advantages on demonstration rows (demo_part="sft" ignores them)
    kw3 = {k: v for k, v in clean.items() if k not in ("rewards", "group_ids")}
    a = torch.randn(B)
    a[demo] = float("nan")
    o3 = run_ours(cfg, hid, w, b, tgt, kw3 | {"advantages": a})
    assert math.isfinite(o3[0].loss.item()) and torch.isfinite(o3[1]).all()


def test_hpt_group_size_counts_main_rows_only():
    cfg, hid, w, b, tgt, kw = make_case("hpt", 13)
    kw.pop("group_ids")
    # main rows 0, 1, 3, 4 -> groups (0, 1) and (3, 4)
    a = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw, group_size=2)
    c = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw,
                            group_ids=torch.tensor([0, 0, 5, 1, 1, 6]))
    assert a.loss.item() == c.loss.item() and a.metrics == c.metrics


def test_nan_hidden_state_at_masked_position_does_not_poison():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 14)
    hid = hid.clone()
    assert not bool(kw["loss_mask"][1, 4])
    hid[1, 4] = float("nan")                      # masked position, valid target id
    out, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw)
    assert math.isfinite(out.loss.item()) and all(math.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert torch.equal(gh[1, 4], torch.zeros(H))
    assert math.isnan(out.logprobs[1, 4].item())  # the raw per-token output still shows it


def test_bfloat16_inputs():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 15)
    o32, gh32, gw32, _ = run_ours(cfg, hid, w, None, tgt, kw)
    kwb = dict(kw)
    o16 = unified_policy_loss(hid.bfloat16().requires_grad_(True), w.bfloat16(), tgt, config=cfg, **kwb)
    assert o16.logprobs.dtype == torch.float32 and o16.loss.dtype == torch.float32
    assert abs(o16.loss.item() - o32.loss.item()) < 0.05 * max(1.0, abs(o32.loss.item()))


@pytest.mark.parametrize("name", ["grpo", "hpt_release", "sft"])
def test_temperature_and_softcap_vs_reference(name, monkeypatch):
    monkeypatch.setitem(_call_extra, "temperature", 0.7)
    monkeypatch.setitem(_call_extra, "softcap", 3.0)
    check_against_reference(name, dtype=torch.float64, tol_loss=1e-11, tol_grad=1e-9, tol_metric=1e-11)


# ----------------------------------------------------------------------------------------- fuzz
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def random_configs(draw):
    reference = draw(st.sampled_from(["current", "old", "one", "shaped"]))
    stab = draw(st.sampled_from(["none", "clip", "cispo", "sapo", "vespo"])) if reference == "old" else "none"
    level = draw(st.sampled_from(["token", "sequence"])) if stab in ("none", "clip") and reference == "old" \
        else "token"
    like = draw(st.sampled_from(["logp", "dft", "chi2", "hellinger"])) if reference == "current" else "logp"
    kw = dict(stabilization=stab, reference=reference, likelihood=like, ratio_level=level,
              advantage=draw(st.sampled_from(["given", "mean_std", "mean", "rloo", "batch_std", "one"])),
              aggregation=draw(st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                                "seq_mean_token_sum_norm"])),
              max_completion_length=7,
              kl_coef=draw(st.sampled_from([0.0, 0.1])), kl_type=draw(st.sampled_from(["k1", "k2", "k3"])),
              entropy_coef=draw(st.sampled_from([0.0, 0.02])),
              rollout_is=draw(st.sampled_from([None, "token_truncate", "sequence_mask"])),
              demo_part=draw(st.sampled_from([None, "sft", "shaped"])),
              delta=draw(st.sampled_from([None, 1.4])) if stab == "clip" else None,
              dual_clip=draw(st.sampled_from([None, 3.0])) if stab == "clip" else None,
              rl_coef=1.5)
    if kw["demo_part"] is not None:
        kw["demo_coef"] = 0.5
    if kw["demo_part"] == "shaped" and kw["advantage"] == "one":
        kw["advantage"] = "given"
    if stab == "vespo" and kw["rollout_is"] == "sequence_mask":
        kw["rollout_is"] = "token_mask"
    kw["kl_bias_correction"] = draw(st.booleans()) if reference == "old" else False
    return LossConfig(**kw), draw(st.integers(0, 10_000))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_configs())
def test_fuzz_random_configs_vs_reference(cfg_seed):
    """Random combinations of the parts (float64) against the reference, incl. the zero pattern."""
    cfg, seed = cfg_seed
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    tgt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    lp = token_logprobs_reference(hid, w, tgt, bias=b)
    kw = dict(loss_mask=mask, ref_logprobs=lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
              rollout_logprobs=lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    if cfg.reference == "old":
        kw["old_logprobs"] = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if cfg.demo_part is not None:
        kw["is_demo"] = torch.rand(B, generator=g) > 0.6
    if cfg.advantage == "given":
        kw["advantages"] = torch.randn(B, T, generator=g, dtype=torch.float64) if seed % 2 \
            else torch.randn(B, generator=g, dtype=torch.float64)
    elif cfg.advantage != "one":
        kw["rewards"] = torch.randint(0, 3, (B,), generator=g).double()
        if cfg.demo_part == "sft" and cfg.advantage == "rloo":
            # groups of main rows could hold a single rollout (rloo refuses): precomputed advantages
            kw["advantages"] = torch.randn(B, dtype=torch.float64)
            del kw["rewards"]
        elif cfg.demo_part == "sft":
            # groups of the main rows (demonstrations stay out of them), of one size: whole groups
            main = (~kw["is_demo"]).nonzero().flatten()
            gid = torch.full((B,), 9)
            gid[main] = torch.arange(len(main)) % (2 if len(main) % 2 == 0 else 1)
            kw["group_ids"] = gid
        else:
            kw["group_size"] = 3
    out, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw)
    loss_r, m_r, lp_r, ent_r, coef_r, gh_r, gw_r, gb_r = run_ref(cfg, hid, w, b, tgt, kw)
    assert abs(out.loss.item() - loss_r.item()) <= 1e-10 * max(1.0, abs(loss_r.item()))
    for a, r in ((gh, gh_r), (gw, gw_r), (gb, gb_r)):
        assert (a - r).abs().max() <= 1e-9 * max(1.0, float(r.abs().max()))
    for k, v in m_r.items():
        assert abs(out.metrics[k] - v) <= 1e-10 * max(1.0, abs(v)), k
    assert torch.equal(out.coef_logp == 0, coef_r == 0)


def test_luffy_joint_token_normalization_via_part_weights():
    """LUFFY's single token mean over on- and off-policy traces = our parts weighted by token shares."""
    cfg, hid, w, b, tgt, kw = make_case("luffy", 16, dtype=torch.float64)
    out = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw)
    n_on, n_off = out.metrics["rollout_tokens"], out.metrics["demo_tokens"]
    joint_cfg = cfg.replace(rl_coef=n_on / (n_on + n_off), demo_coef=n_off / (n_on + n_off))
    joint = unified_policy_loss(hid, w, tgt, config=joint_cfg, bias=b, **kw)
    # the same quantity written directly: sum of all per-token losses / all valid tokens
    direct = (out.metrics["loss_main"] * n_on + out.metrics["loss_demo"] * n_off) / (n_on + n_off)
    assert joint.loss.item() == pytest.approx(direct, rel=1e-12)


# ----------------------------------------------------------------------------------------- VESPO / bias-corrected KL
@pytest.mark.parametrize("shape", ["row", "row1", "token"])
def test_vespo_folds_is_ratio_into_the_sequence_weight(shape):
    """VESPO: is_ratio ([B], [B, 1] or [B, T]) enters phi in log space and does not multiply the loss."""
    cfg, hid, w, b, tgt, kw = make_case("vespo", 21, dtype=torch.float64, overrides=dict(kl_coef=0.05))
    g = torch.Generator().manual_seed(22)
    isr = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.25
    isr[2, 1] = 0.0    # a masked-out IS token (token_mask): log floor 1e-8
    kw["is_ratio"] = {"row": isr[:, 0], "row1": isr[:, :1], "token": isr}[shape]
    out, gh, gw, gb = run_ours(cfg, hid, w, b, tgt, kw)
    loss_r, m_r, lp_r, ent_r, coef_r, gh_r, gw_r, gb_r = run_ref(cfg, hid, w, b, tgt, kw)
    assert abs(out.loss.item() - loss_r.item()) <= 1e-11 * max(1.0, abs(loss_r.item()))
    for a, r in ((gh, gh_r), (gw, gw_r), (gb, gb_r)):
        assert (a - r).abs().max() <= 1e-9 * max(1.0, float(r.abs().max()))
    for k, v in m_r.items():
        assert abs(out.metrics[k] - v) <= 1e-11 * max(1.0, abs(v)), k
    assert torch.equal(out.coef_logp == 0, coef_r == 0)
    # phi(1) = 1: on-policy without IS weights, the policy coefficient is exactly A
    base = unified_policy_loss(hid, w, tgt, config=cfg.replace(kl_coef=0.0), bias=b,
                               loss_mask=kw["loss_mask"], advantages=torch.linspace(-1, 1, B, dtype=torch.float64))
    assert base.metrics["vespo_phi_mean"] == 1.0


def test_bias_corrected_kl_on_policy_value_and_gradient():
    """On-policy (old = sg(logp)) the ratio is 1 in value, so the loss equals the uncorrected one, while the
    KL coefficient gains kl_coef * k(d) per token / n (the ratio's gradient)."""
    cfg, hid, w, b, tgt, kw = make_case("bnpo", 23, dtype=torch.float64, overrides=dict(kl_coef=0.2))
    kw.pop("old_logprobs")
    plain = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, **kw)
    corr = unified_policy_loss(hid, w, tgt, config=cfg.replace(kl_bias_correction=True), bias=b, **kw)
    assert corr.loss.item() == pytest.approx(plain.loss.item(), rel=1e-14, abs=1e-15)
    d = plain.logprobs - kw["ref_logprobs"]
    k3 = torch.exp(-d) + d - 1
    valid = kw["loss_mask"] & (tgt != -100)
    n = valid.sum()
    want = plain.coef_logp - torch.where(valid, 0.2 * k3 / n, torch.zeros_like(k3))
    torch.testing.assert_close(corr.coef_logp, want, rtol=1e-12, atol=1e-15)
    assert torch.equal(corr.coef_logp[~valid], torch.zeros_like(corr.coef_logp[~valid]))
