"""The fused Triton loss epilogue (kernels/triton_epilogue.py, losses/fused.py) against the PyTorch
epilogue on the same backend (loss, metrics, coefficients with their exact zeros, all gradients), against
the float64 reference for a subset, and the dispatch: the fused path is taken for token-local configs
and falls back for sequence-level ones. Runs under TRITON_INTERPRET=1 on the CPU (conftest.py)."""
import pytest
import torch

pytest.importorskip("triton")

from test_losses import B, T, check_against_reference, make_case  # noqa: E402

from upg_kernels import LossConfig, unified_policy_loss  # noqa: E402
from upg_kernels.kernels import triton_epilogue  # noqa: E402
from upg_kernels.losses.fused import fused_supported  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUPPORTED_PRESETS = ["sft", "dft", "chi2_sft", "hellinger_sft", "reinforce", "rloo", "ppo", "grpo",
                     "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luffy", "hpt", "hpt_release"]
VARIANTS = [
    ("ppo", dict(delta=1.3)),
    ("ppo", dict(dual_clip=3.0)),
    ("ppo", dict(dual_clip=3.0, delta=1.4, eps_high=0.28)),
    ("grpo", dict(kl_coef=0.05, kl_type="k1")),
    ("grpo", dict(kl_coef=0.05, kl_type="k2")),
    ("grpo", dict(kl_coef=0.05, kl_type="k3", entropy_coef=0.01)),
    ("grpo", dict(kl_coef=0.05, kl_bias_correction=True)),
    ("dapo", dict(kl_coef=0.1, kl_type="k2", kl_bias_correction=True, delta=1.3)),
    ("cispo", dict(kl_coef=0.05, kl_bias_correction=True, rollout_is="token_truncate")),
    ("dapo", dict(rollout_is="token_truncate", rollout_is_cap=1.5)),
    ("dapo", dict(rollout_is="token_mask", rollout_is_cap=1.5)),
    ("sapo", dict(entropy_coef=0.02, rollout_is="token_mask")),
    ("grpo", dict(stabilization="none")),
    ("grpo", dict(advantage="rloo", aggregation="seq_mean_token_sum")),
    ("reinforce", dict(reference="one")),
    ("reinforce", dict(reference="shaped")),
    ("reinforce", dict(kl_coef=0.1, kl_type="k1")),          # KL without ref_logprobs given
    ("chi2_sft", dict(fdiv_beta=1.0)),
    ("hellinger_sft", dict(fdiv_beta=1.0)),                 # u above the 1/2 cap on some tokens
    ("dft", dict(aggregation="seq_mean_token_mean")),
    ("sft", dict(aggregation="seq_mean_token_sum")),
    ("hpt", dict(demo_aggregation="seq_mean_token_mean", demo_coef=0.3, rl_coef=0.7)),
    ("hpt", dict(rl_coef=0.0)),
    ("hpt_release", dict(entropy_coef=0.05)),
    ("luffy", dict(shaping_gamma=0.3, entropy_coef=0.01)),
]
UNSUPPORTED = [("gspo", {}), ("luspo", {}), ("vespo", {}),
               ("grpo", dict(rollout_is="sequence_truncate")), ("grpo", dict(rollout_is="sequence_mask")),
               ("grpo", dict(ratio_level="sequence", stabilization="none"))]


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the fused epilogue (the op imports ``epilogue`` at call time)."""
    n = {"epilogue": 0}
    orig = triton_epilogue.epilogue

    def spy(*a, **k):
        n["epilogue"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(triton_epilogue, "epilogue", spy)
    return n


def _run(cfg, hid, w, b, tgt, kw, *, fused, extra=None, grad=True):
    h = hid.clone().to(DEVICE).requires_grad_(grad)
    ww = w.clone().to(DEVICE).requires_grad_(grad)
    bb = None if b is None else b.clone().to(DEVICE).requires_grad_(grad)
    kw2 = {k: (v.to(hid.dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
               and k != "rewards" else v) for k, v in {**kw, **(extra or {})}.items()}
    kw2 = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw2.items()}
    out = unified_policy_loss(h, ww, tgt.to(DEVICE), config=cfg, bias=bb, backend="triton",
                              fused_epilogue=fused, **kw2)
    if grad:
        out.loss.backward()
        grads = [x.grad.cpu() for x in (h, ww, bb) if x is not None]
    else:
        grads = []
    return out, grads


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def compare_paths(name, overrides=None, *, seed=0, flat=False, extra=None, tgt_fn=None, tol=2e-6):
    """Fused vs PyTorch epilogue on the Triton backend; returns the max differences."""
    cfg, hid, w, b, tgt, kw = make_case(name, seed, dtype=torch.float32, flat=flat, overrides=overrides)
    if tgt_fn is not None:
        tgt = tgt_fn(tgt)
    assert fused_supported(cfg)
    of, gf = _run(cfg, hid, w, b, tgt, kw, fused=True, extra=extra)
    op, gp = _run(cfg, hid, w, b, tgt, kw, fused=False, extra=extra)
    err = {}
    err["loss"] = abs(of.loss.item() - op.loss.item()) / max(1.0, abs(op.loss.item()))
    assert err["loss"] < tol, (name, overrides, of.loss.item(), op.loss.item())
    assert set(of.metrics) == set(op.metrics)
    err["metrics"] = max(abs(of.metrics[k] - op.metrics[k]) / max(1.0, abs(op.metrics[k]))
                         for k in op.metrics)
    assert err["metrics"] < tol, (name, overrides, {k: (of.metrics[k], op.metrics[k]) for k in op.metrics
                                                     if abs(of.metrics[k] - op.metrics[k]) > 1e-7})
    assert torch.equal(of.logprobs, op.logprobs) or _rel(of.logprobs, op.logprobs) < 1e-6
    assert _rel(of.entropy, op.entropy) < 1e-6
    for nm in ("coef_logp", "coef_entropy"):
        a, r = getattr(of, nm), getattr(op, nm)
        assert torch.equal(a == 0, r == 0), (name, overrides, nm)       # exact zeros, same places
        if bool((r != 0).any()):
            err[nm] = _rel(a, r)
            assert err[nm] < tol, (name, overrides, nm, err[nm])
    for nm, a, r in zip(("hidden", "weight", "bias"), gf, gp):
        assert torch.isfinite(a).all()
        if float(r.abs().max()) == 0:
            assert float(a.abs().max()) == 0
            continue
        err[nm] = _rel(a, r)
        assert err[nm] < tol, (name, overrides, nm, err[nm])
        assert torch.equal(a == 0, r == 0) if nm == "hidden" else True  # skipped rows: exact zeros
    return err


# ----------------------------------------------------------------------------------------- fused vs PyTorch
@pytest.mark.parametrize("name", SUPPORTED_PRESETS)
def test_preset_fused_vs_pytorch_epilogue(name, launches):
    compare_paths(name)
    assert launches["epilogue"] == 1


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_variant_fused_vs_pytorch_epilogue(name, overrides, launches):
    compare_paths(name, overrides, seed=3)
    assert launches["epilogue"] == 1


@pytest.mark.parametrize("name", ["grpo", "hpt", "sft"])
def test_flat_input(name):
    compare_paths(name, flat=True, seed=1)


def test_is_ratio_per_row_and_per_token():
    g = torch.Generator().manual_seed(0)
    compare_paths("dapo", extra=dict(is_ratio=torch.rand(B, generator=g) + 0.5))
    compare_paths("grpo", dict(kl_coef=0.05), extra=dict(is_ratio=torch.rand(B, T, generator=g) + 0.5))
    compare_paths("cispo", extra=dict(is_ratio=torch.rand(B, 1, generator=g) + 0.5))


def test_temperature_softcap_num_items():
    compare_paths("grpo", extra=dict(temperature=0.7))
    compare_paths("dapo", extra=dict(num_items_in_batch=40, temperature=1.3, softcap=3.0))


def test_ignore_index_rows_and_all_masked_rows():
    def ignore_row(t):
        t = t.clone()
        t[2, :] = -100          # a fully ignored row (never visited by the kernels)
        return t
    compare_paths("grpo", tgt_fn=ignore_row)
    compare_paths("hpt", tgt_fn=ignore_row)
    # every token of the batch masked: loss 0, all coefficients 0, no gradient
    cfg, hid, w, b, tgt, kw = make_case("grpo", 2, dtype=torch.float32)
    kw["loss_mask"] = torch.zeros(B, T, dtype=torch.bool)
    of, gf = _run(cfg, hid, w, b, tgt, kw, fused=True)
    op, gp = _run(cfg, hid, w, b, tgt, kw, fused=False)
    assert of.loss.item() == 0.0 and op.loss.item() == 0.0
    assert not bool(of.coef_logp.any()) and all(float(g.abs().max()) == 0 for g in gf)
    assert of.metrics == op.metrics
    # every target ignored: the forward kernel is not launched at all
    of, gf = _run(cfg, hid, w, b, torch.full_like(tgt, -100), kw, fused=True)
    assert of.loss.item() == 0.0 and all(float(g.abs().max()) == 0 for g in gf)


def test_nan_old_ref_rollout_at_masked_tokens_do_not_leak():
    cfg, hid, w, b, tgt, kw = make_case("dapo", 6, dtype=torch.float32,
                                        overrides=dict(kl_coef=0.1, rollout_is="token_truncate"))
    for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        assert torch.isnan(kw[k]).any()
    of, gf = _run(cfg, hid, w, b, tgt, kw, fused=True)
    assert torch.isfinite(of.loss) and all(torch.isfinite(g).all() for g in gf)
    assert all(v == v for v in of.metrics.values())
    compare_paths("dapo", dict(kl_coef=0.1, rollout_is="token_truncate"), seed=6)


def test_equal_reward_groups_exact_zero_and_skipped(monkeypatch):
    """The equal-reward group's rows reach the Triton (GEMM) backward with exactly-zero coefficients."""
    from upg_kernels.kernels import gemm_backward
    seen = {}
    orig = gemm_backward.backward

    def spy(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, *a, **k):
        seen["g"] = g_logp.clone()
        return orig(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, *a, **k)

    monkeypatch.setattr(gemm_backward, "backward", spy)
    cfg, hid, w, b, tgt, kw = make_case("bnpo", 4, dtype=torch.float32)
    of, _ = _run(cfg, hid, w, b, tgt, kw, fused=True)
    g = seen["g"].reshape(B, T)
    assert bool((g[3:] == 0).all())                     # group {3, 4, 5} has equal rewards
    assert torch.equal(g == 0, of.coef_logp == 0)


def test_no_grad_and_on_policy():
    cfg, hid, w, b, tgt, kw = make_case("grpo", 7, dtype=torch.float32)
    kw.pop("old_logprobs")                              # on-policy: old = sg(logp), ratio 1
    with torch.no_grad():
        of, _ = _run(cfg, hid, w, b, tgt, kw, fused=True, grad=False)
        op, _ = _run(cfg, hid, w, b, tgt, kw, fused=False, grad=False)
    assert not of.loss.requires_grad
    assert abs(of.loss.item() - op.loss.item()) < 1e-6
    assert of.metrics["ratio_mean"] == 1.0 and of.metrics["clip_frac"] == 0.0
    compare_paths("grpo", dict(kl_coef=0.05, kl_bias_correction=True), seed=7,
                  extra=dict(old_logprobs=None))


# ----------------------------------------------------------------------------------------- float64 reference
@pytest.mark.parametrize("name,overrides", [
    ("grpo", dict(kl_coef=0.05, entropy_coef=0.01)), ("hpt", {}), ("luffy", {}), ("sapo", {}),
    ("chi2_sft", {}), ("hellinger_sft", dict(fdiv_beta=1.0)), ("ppo", dict(dual_clip=3.0, delta=1.3)),
    ("dapo", dict(rollout_is="token_mask", rollout_is_cap=1.5, kl_coef=0.1, kl_bias_correction=True)),
])
def test_fused_vs_float64_reference(name, overrides, launches):
    check_against_reference(name, dtype=torch.float32, tol_loss=2e-5, tol_grad=5e-4, tol_metric=2e-5,
                            backend="triton", overrides=overrides, device=DEVICE)
    assert launches["epilogue"] == 1


# ----------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("name,overrides", UNSUPPORTED,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(UNSUPPORTED)])
def test_unsupported_configs_fall_back(name, overrides, launches):
    cfg, hid, w, b, tgt, kw = make_case(name, 0, dtype=torch.float32, overrides=overrides)
    assert not fused_supported(cfg)
    out, grads = _run(cfg, hid, w, b, tgt, kw, fused=None)
    assert launches["epilogue"] == 0 and torch.isfinite(out.loss)


def test_switches_force_the_pytorch_epilogue(launches, monkeypatch):
    cfg, hid, w, b, tgt, kw = make_case("grpo", 0, dtype=torch.float32)
    _run(cfg, hid, w, b, tgt, kw, fused=None)
    assert launches["epilogue"] == 1
    _run(cfg, hid, w, b, tgt, kw, fused=False)
    assert launches["epilogue"] == 1
    monkeypatch.setenv("UPG_KERNELS_FUSED_EPILOGUE", "0")
    _run(cfg, hid, w, b, tgt, kw, fused=None)
    assert launches["epilogue"] == 1
    monkeypatch.delenv("UPG_KERNELS_FUSED_EPILOGUE")
    # the torch backend never takes it
    out = unified_policy_loss(hid, w, tgt, config=cfg, bias=b, backend="torch", **kw)
    assert launches["epilogue"] == 1 and torch.isfinite(out.loss)


def test_supported_set():
    for name in SUPPORTED_PRESETS:
        assert fused_supported(LossConfig.preset(name, max_completion_length=16)), name
    for name, ov in UNSUPPORTED:
        assert not fused_supported(LossConfig.preset(name, **ov)), name


def test_custom_op_opcheck_and_compile():
    """The op has a schema, a fake (meta) implementation and registered autograd, so torch.compile
    traces it as one node; the loss under torch.compile equals eager."""
    from upg_kernels import ops
    from upg_kernels.losses import fused as F
    cfg, hid, w, b, tgt, kw = make_case("grpo", 0, dtype=torch.float32, overrides=dict(kl_coef=0.05))
    N = B * T
    g = torch.Generator().manual_seed(0)
    args = (hid.reshape(N, -1).contiguous().requires_grad_(True), w.contiguous(), b, tgt.reshape(-1).contiguous(),
            None, None, None, torch.randn(N, generator=g), None, torch.rand(N, generator=g),
            torch.ones(N, dtype=torch.int8), 1.0, -100, 0.0, 0.0, "triton",
            *F.EpilogueParams.from_config(cfg).to_lists())
    res = torch.library.opcheck(ops.fused_policy_epilogue_op, args, test_utils=("test_schema", "test_faketensor",
                                                               "test_autograd_registration"))
    assert all(v == "SUCCESS" for v in res.values()), res
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and k != "rewards" else v)
          for k, v in kw.items()}

    def f(h):
        return unified_policy_loss(h, w, tgt, config=cfg, bias=b, backend="triton", **kw).loss

    h = hid.clone().requires_grad_(True)
    f(h).backward()
    g0 = h.grad.clone()
    h.grad = None
    torch._dynamo.reset()
    loss = torch.compile(f, backend="aot_eager")(h)
    loss.backward()
    assert abs(loss.item() - f(hid).item()) < 1e-6 and torch.allclose(h.grad, g0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["grpo", "hpt"])
def test_bfloat16_inputs(name):
    cfg, hid, w, b, tgt, kw = make_case(name, 0, dtype=torch.bfloat16)
    of, gf = _run(cfg, hid, w, b, tgt, kw, fused=True)
    op, gp = _run(cfg, hid, w, b, tgt, kw, fused=False)
    assert abs(of.loss.item() - op.loss.item()) <= 1e-6 * max(1.0, abs(op.loss.item()))
    assert torch.equal(of.coef_logp == 0, op.coef_logp == 0)
    for a, r in zip(gf, gp):
        assert a.dtype == torch.bfloat16 and _rel(a, r) < 1e-2
