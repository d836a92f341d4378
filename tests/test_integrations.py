"""Drop-ins for existing trainers: Liger's GRPO loss, TRL's GRPOTrainer, Cut Cross-Entropy.

* Liger parity: ``upg_kernels.FusedLinearGRPOLoss`` against ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``
  (liger-kernel 0.8.5, ``compiled=False``: its chunked PyTorch path, which runs on CPU) -- loss, every metric,
  and the gradients w.r.t. input, weight and bias, over every loss type x importance-sampling level x beta x
  delta x temperature x vllm_is_ratio x num_items_in_batch.
* TRL wiring: a real ``trl.GRPOTrainer`` on a tiny randomly initialised Llama (built from a config, no
  downloads); ``patch_grpo_trainer`` must route its log-probs through upg-kernels and leave loss and gradients
  unchanged, and TRL's GRPO loss must equal ``FusedLinearGRPOLoss`` on the model's hidden states.
* CCE convention: ``linear_cross_entropy`` against a float64 materialized-logits reference and against
  ``cut_cross_entropy``'s own torch implementation (run eagerly).

Tolerances (float32 inputs of O(1), V <= 64): loss and metrics ``atol=2e-5, rtol=2e-5``; gradients
``atol=2e-5, rtol=1e-4`` relative to the largest gradient entry. Set ``UPG_PARITY_REPORT=1`` to print the
largest differences seen.
"""
from __future__ import annotations

import itertools
import os
from collections import defaultdict

import pytest
import torch

import upg_kernels
from upg_kernels.integrations import FusedLinearGRPOLoss, linear_cross_entropy

_REPORT = defaultdict(lambda: [0.0, 0.0])  # quantity -> [max abs diff, max rel diff]


def _record(name, ours, ref):
    ours = ours.detach().double()
    ref = ref.detach().double()
    ad = (ours - ref).abs().max().item() if ours.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rd = ad / scale if scale > 0 else ad
    r = _REPORT[name]
    r[0] = max(r[0], ad)
    r[1] = max(r[1], rd)
    return ad, rd


@pytest.fixture(scope="module", autouse=True)
def _parity_report():
    yield
    if os.environ.get("UPG_PARITY_REPORT") and _REPORT:
        print("\nparity (max abs diff, max diff / max |reference|):")
        for k in sorted(_REPORT):
            print(f"  {k:28s} {_REPORT[k][0]:.3e}  {_REPORT[k][1]:.3e}")


def _close(name, ours, ref, atol, rtol):
    ad, _ = _record(name, ours, ref)
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    assert ad <= atol + rtol * scale, f"{name}: max abs diff {ad:.3e} (reference scale {scale:.3e})"


# ============================================================================ Liger parity
def _grpo_case(seed, *, B=4, T=7, H=16, V=48, bias=True, temperature=1.0, old_noise=0.35, dtype=torch.float32,
               padded=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    b = torch.randn(V, generator=g, dtype=dtype) * 0.3 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    if padded:
        mask[0, T - 2:] = 0          # padded tail
        mask[1, :1] = 0              # masked head
        if B > 3:
            mask[3] = 0              # a fully masked row (counts in B for grpo, adds nothing)
    adv = torch.randn(B, generator=g)
    adv[0] = adv[0].abs() + 0.1  # one positive and one negative row: both clip directions occur
    adv[1] = -adv[1].abs() - 0.1
    adv[2] = 0.0                 # an equal-reward group: zero advantage
    # true log-probs, then old/ref close to them so that ratios straddle the clip bounds
    with torch.no_grad():
        z = hidden.double() @ weight.double().T
        if b is not None:
            z = z + b.double()
        lp = torch.log_softmax(z / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    old = lp + old_noise * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    is_tok = torch.rand(B, T, generator=g) * 1.5 + 0.25
    is_seq = torch.rand(B, generator=g) * 1.5 + 0.25
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, mask=mask, adv=adv, old=old, ref=ref,
                is_tok=is_tok, is_seq=is_seq)


def _run_grpo(cls, case, ctor, fwd, *, grad=True):
    x = case["hidden"].clone().requires_grad_(grad)
    w = case["weight"].clone().requires_grad_(grad)
    b = None if case["bias"] is None else case["bias"].clone().requires_grad_(grad)
    mod = cls(**ctor)
    loss, metrics = mod(x, w, case["ids"], case["mask"], case["adv"], b, **fwd)
    grads = None
    if grad:
        loss.backward()
        grads = (x.grad, w.grad, None if b is None else b.grad)
    return loss.detach(), tuple(m.detach() for m in metrics), grads


def _liger_combos():
    out = []
    for lt, lvl in itertools.product(("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"),
                                     ("token", "sequence")):
        if lvl == "sequence" and lt in ("cispo", "sapo", "vespo"):
            continue
        for beta in (0.0, 0.1):
            out.append((lt, lvl, beta))
    return out


# (delta, temperature, vllm_is_ratio kind, num_items_in_batch, old given, spread of old around logp)
_VARIANTS = [
    (None, 1.0, None, None, True, 0.35),
    (1.3, 0.7, "token", 40, True, 0.35),
    (None, 1.3, "seq", None, True, 1.2),   # wide: sequence ratios and CISPO's cap get clipped too
    (1.1, 1.0, "seq1d", 25.0, False, 0.35),
]


@pytest.mark.parametrize("loss_type,level,beta", _liger_combos())
def test_liger_parity(loss_type, level, beta):
    """With beta != 0, variants 1 and 3 use use_bias_correction_kl=True (TRL 1.16's default), 0 and 2 do not.

    Padding: Liger's luspo counts padded positions whenever its per-token loss is [B, T]-shaped (token level,
    beta != 0 or a [B, T] vllm_is_ratio) and its vespo sums log(vllm_is_ratio) over padded positions too; we
    mask them (as TRL 1.16 does). Those cases run without padding / with ratio 1 at padded positions, where the
    two definitions agree (docs/integrations.md)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    clip_seen = 0.0
    for i, (delta, temp, vllm, nib, with_old, spread) in enumerate(_VARIANTS):
        per_token_luspo = loss_type == "luspo" and (level == "token" or beta != 0.0 or vllm == "token")
        case = _grpo_case(100 + i, temperature=temp, bias=(i != 2), old_noise=spread, padded=not per_token_luspo)
        if loss_type == "vespo":
            case["is_tok"] = torch.where(case["mask"] > 0, case["is_tok"], torch.ones_like(case["is_tok"]))
        ctor = dict(beta=beta, use_ref_model=beta != 0.0, epsilon_low=0.2,
                    epsilon_high=(3.0 if loss_type == "cispo" else 0.28), loss_type=loss_type,
                    max_completion_length=10, importance_sampling_level=level, temperature=temp,
                    delta=delta if loss_type not in ("cispo", "sapo", "vespo") else None,
                    use_bias_correction_kl=bool(beta) and i % 2 == 1,
                    vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)
        fwd = dict(old_per_token_logps=case["old"] if with_old else None,
                   ref_per_token_logps=case["ref"] if beta else None,
                   vllm_is_ratio={None: None, "token": case["is_tok"], "seq": case["is_seq"].unsqueeze(1),
                                  "seq1d": case["is_seq"]}[vllm],
                   num_items_in_batch=nib)
        l_ref, m_ref, g_ref = _run_grpo(LigerFusedLinearGRPOLoss, case, dict(ctor, compiled=False), fwd)
        l_our, m_our, g_our = _run_grpo(FusedLinearGRPOLoss, case, dict(ctor, compiled=True), fwd)
        assert l_our.dtype == torch.float32 and l_our.dim() == 0
        _close("loss", l_our, l_ref, 2e-5, 2e-5)
        assert len(m_our) == len(m_ref), (m_our, m_ref)
        for j, (a, r) in enumerate(zip(m_our, m_ref)):
            name = "metric kl_mean" if (beta and j == 0) else "metric clip_ratio"
            _close(name, a, r, 2e-5, 2e-5)
        clip_seen = max(clip_seen, float(m_ref[-1]))
        for name, a, r in zip(("grad input", "grad weight", "grad bias"), g_our, g_ref):
            if r is None:
                assert a is None
                continue
            _close(name, a, r, 2e-5, 1e-4)
    if loss_type not in ("sapo", "vespo"):  # the cases do exercise clipping (SAPO/VESPO: no clip metric, always 0)
        assert clip_seen > 0


def test_liger_parity_bf16_inputs():
    """bf16 hidden/weight/bias: both compute the logits in bf16 and accumulate in fp32; same result to bf16 rounding."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    case = _grpo_case(100, dtype=torch.bfloat16)
    ctor = dict(beta=0.1, loss_type="grpo", epsilon_high=0.28)
    fwd = dict(old_per_token_logps=case["old"], ref_per_token_logps=case["ref"])
    l_ref, m_ref, g_ref = _run_grpo(LigerFusedLinearGRPOLoss, case, dict(ctor, compiled=False), fwd)
    l_our, m_our, g_our = _run_grpo(FusedLinearGRPOLoss, case, ctor, fwd)
    _close("loss (bf16)", l_our, l_ref, 1e-3, 1e-2)
    for a, r in zip(m_our, m_ref):
        _close("metric (bf16)", a, r, 1e-3, 1e-2)
    for a, r in zip(g_our, g_ref):
        assert a.dtype == r.dtype == torch.bfloat16
        _close("grad (bf16)", a, r, 1e-3, 2e-2)


def test_liger_parity_ref_input_path():
    """use_ref_model with ref_input/ref_weight/ref_bias instead of ref log-probs."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    case = _grpo_case(7, temperature=0.9)
    g = torch.Generator().manual_seed(8)
    ref_w = case["weight"] + 0.05 * torch.randn(case["weight"].shape, generator=g)
    ref_b = case["bias"] + 0.05 * torch.randn(case["bias"].shape, generator=g)
    ref_x = case["hidden"] + 0.05 * torch.randn(case["hidden"].shape, generator=g)
    ctor = dict(beta=0.2, loss_type="grpo", temperature=0.9)
    fwd = dict(old_per_token_logps=case["old"], ref_input=ref_x, ref_weight=ref_w, ref_bias=ref_b)
    l_ref, m_ref, g_ref = _run_grpo(LigerFusedLinearGRPOLoss, case, dict(ctor, compiled=False), fwd)
    l_our, m_our, g_our = _run_grpo(FusedLinearGRPOLoss, case, ctor, fwd)
    _close("loss", l_our, l_ref, 2e-5, 2e-5)
    for a, r in zip(m_our, m_ref):
        _close("metric (ref_input)", a, r, 2e-5, 2e-5)
    for a, r in zip(g_our, g_ref):
        _close("grad (ref_input)", a, r, 2e-5, 1e-4)


def test_liger_use_ref_model_false_ignores_ref():
    """Liger ignores ref_per_token_logps when use_ref_model=False: KL term and KL metric are 0."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    case = _grpo_case(11)
    ctor = dict(beta=0.3, use_ref_model=False, loss_type="bnpo")
    fwd = dict(old_per_token_logps=case["old"], ref_per_token_logps=case["ref"])
    l_ref, m_ref, _ = _run_grpo(LigerFusedLinearGRPOLoss, case, dict(ctor, compiled=False), fwd, grad=False)
    l_our, m_our, _ = _run_grpo(FusedLinearGRPOLoss, case, ctor, fwd, grad=False)
    _close("loss", l_our, l_ref, 2e-5, 2e-5)
    assert len(m_our) == 2 and float(m_our[0]) == 0.0 == float(m_ref[0])


def test_liger_flat_input_and_grad_output_scaling():
    """[B*T, H] input is accepted, and the loss composes with a downstream scale like any autograd scalar."""
    case = _grpo_case(3)
    B, T, H = case["hidden"].shape
    x1 = case["hidden"].clone().requires_grad_(True)
    x2 = case["hidden"].reshape(B * T, H).clone().requires_grad_(True)
    mod = FusedLinearGRPOLoss(beta=0.0, loss_type="dapo", use_ref_model=False)
    l1, _ = mod(x1, case["weight"], case["ids"], case["mask"], case["adv"], old_per_token_logps=case["old"])
    l2, _ = mod(x2, case["weight"], case["ids"], case["mask"], case["adv"], old_per_token_logps=case["old"])
    torch.testing.assert_close(l1, l2)
    (3.0 * l1).backward()
    l2.backward()
    torch.testing.assert_close(x1.grad, 3.0 * x2.grad.reshape(B, T, H))


def test_liger_from_liger_copies_settings():
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    src = LigerFusedLinearGRPOLoss(beta=0.07, epsilon_low=0.1, epsilon_high=0.3, loss_type="dr_grpo",
                                   max_completion_length=9, importance_sampling_level="sequence", temperature=0.8,
                                   delta=2.0)
    ours = FusedLinearGRPOLoss.from_liger(src)
    for k in ("beta", "epsilon_low", "epsilon_high", "loss_type", "max_completion_length",
              "importance_sampling_level", "temperature", "delta", "use_ref_model"):
        assert getattr(ours, k) == getattr(src, k)


@pytest.mark.parametrize("ctor,exc,match,at", [
    (dict(loss_type="vespo", importance_sampling_level="sequence"), ValueError, "Sequence-level", "forward"),
    (dict(loss_type="vespo", vespo_k_pos=-1.0), ValueError, "vespo_k_pos", "forward"),
    (dict(loss_type="nope"), ValueError, "Unknown loss type", "forward"),
    (dict(loss_type="cispo", importance_sampling_level="sequence"), ValueError, "Sequence-level", "forward"),
    (dict(importance_sampling_level="group"), ValueError, "importance sampling level", "forward"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length", "forward"),
    (dict(sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg", "init"),
    (dict(delta=-1.0), ValueError, "delta", "init"),
])
def test_liger_bad_settings(ctor, exc, match, at):
    """Raised where Liger 0.8.5 raises them: the sapo temperatures and delta in __init__, the rest in forward."""
    if at == "init":
        with pytest.raises(exc, match=match):
            FusedLinearGRPOLoss(**ctor)
        return
    mod = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, **ctor)
    case = _grpo_case(5)
    with pytest.raises(exc, match=match):
        mod(case["hidden"], case["weight"], case["ids"], case["mask"], case["adv"])


def test_liger_signature_is_ligers():
    import inspect

    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    ours = list(inspect.signature(FusedLinearGRPOLoss).parameters.items())
    theirs = list(inspect.signature(LigerFusedLinearGRPOLoss).parameters.items())
    assert [(n, p.default) for n, p in ours[:-2]] == [(n, p.default) for n, p in theirs]
    assert [n for n, _ in ours[-2:]] == ["backend", "padded_luspo"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for _, p in ours[-2:])
    assert FusedLinearGRPOLoss(0.1, False, False, 1, 0.3).epsilon_low == 0.3   # positional, Liger's order


def test_liger_bad_inputs():
    case = _grpo_case(5)
    mod = FusedLinearGRPOLoss(beta=0.1)
    x, w, ids, mask, adv = case["hidden"], case["weight"], case["ids"], case["mask"], case["adv"]
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        mod(x, w, ids, mask, adv)
    mod = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
    with pytest.raises(ValueError, match="advantages"):
        mod(x, w, ids, mask, adv[:-1])
    with pytest.raises(ValueError, match="advantages"):
        mod(x, w, ids, mask, adv.unsqueeze(1).expand(-1, ids.shape[1]))
    with pytest.raises(ValueError, match="attention_mask"):
        mod(x, w, ids, mask[:, :-1], adv)
    with pytest.raises(ValueError, match="_input"):
        mod(x[:, :-1], w, ids, mask, adv)
    with pytest.raises(ValueError, match="old_per_token_logps"):
        mod(x, w, ids, mask, adv, old_per_token_logps=case["old"][:, :-1])
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        mod(x, w, ids, mask, adv, vllm_is_ratio=torch.ones(ids.shape[0], 3))


# ============================================================================ CCE convention
def _lce_reference(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0):
    """float64, materialized logits, the convention of CCE's docstring."""
    e, c = e.double(), c.double()
    if shift:
        e = e[..., :-shift, :]
        targets = targets[..., shift:]
    z = e @ c.T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1),
                                             ignore_index=ignore_index, reduction="none").reshape(targets.shape)
    if reduction == "none":
        return loss
    valid = targets != ignore_index
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


@pytest.mark.parametrize("shift", [0, 1, True, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extras", [dict(), dict(softcap=4.0), dict(bias=True, ignore_index=7)])
def test_cce_against_float64(shift, reduction, extras):
    g = torch.Generator().manual_seed(hash((shift, reduction, len(extras))) % 1000)
    B, T, D, V = 3, 9, 16, 40
    e = torch.randn(B, T, D, generator=g, requires_grad=True)
    c = (torch.randn(V, D, generator=g) * 0.5).requires_grad_(True)
    ignore_index = extras.get("ignore_index", -100)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 4] = ignore_index
    t[2, -1] = ignore_index
    bias = (torch.randn(V, generator=g) * 0.2).requires_grad_(True) if extras.get("bias") else None
    kw = dict(bias=bias, ignore_index=ignore_index, softcap=extras.get("softcap"), reduction=reduction)
    ours = linear_cross_entropy(e, c, t, shift=shift, **kw)
    ref = _lce_reference(e, c, t, shift=int(shift), **kw)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    _close("cce loss", ours, ref, 1e-5, 1e-5)
    if reduction == "none":
        assert (ours[t[..., int(shift):] == ignore_index] == 0).all()
    w = torch.randn(ours.shape, generator=g)
    gs = torch.autograd.grad((ours * w).sum(), [e, c] + ([bias] if bias is not None else []))
    gr = torch.autograd.grad((ref * w.double()).sum(), [e, c] + ([bias] if bias is not None else []))
    for name, a, r in zip(("cce grad e", "cce grad c", "cce grad bias"), gs, gr):
        _close(name, a, r, 1e-5, 1e-5)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cce_against_cut_cross_entropy(shift, reduction):
    """The same numbers and shapes as cut_cross_entropy 25.1.1's torch implementation (run eagerly)."""
    cce = pytest.importorskip("cut_cross_entropy")
    g = torch.Generator().manual_seed(3)
    e = torch.randn(2, 3, 6, 16, generator=g, requires_grad=True)  # extra leading dims
    c = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 3, 6), generator=g)
    t[0, 1, 3] = -100
    t[1, 2, 0] = -100
    with torch.compiler.set_stance("force_eager"):
        ref = cce.linear_cross_entropy(e, c, t, shift=shift, reduction=reduction, softcap=5.0,
                                       impl="torch_compile")
    ours = linear_cross_entropy(e, c, t, shift=shift, reduction=reduction, softcap=5.0)
    assert ours.shape == ref.shape
    _close("cce vs cut_cross_entropy", ours, ref, 1e-5, 1e-5)
    ga = torch.autograd.grad(ours.sum(), [e, c])
    gb = torch.autograd.grad(ref.sum(), [e, c])
    for a, r in zip(ga, gb):
        _close("cce grad vs cut_cross_entropy", a, r, 1e-5, 1e-5)


def test_cce_module_and_flat_inputs():
    g = torch.Generator().manual_seed(4)
    e = torch.randn(10, 8, generator=g)
    c = torch.randn(20, 8, generator=g)
    t = torch.randint(0, 20, (10,), generator=g)
    m = upg_kernels.integrations.cce.LinearCrossEntropy(reduction="sum")
    torch.testing.assert_close(m(e, c, t), linear_cross_entropy(e, c, t, reduction="sum"))
    torch.testing.assert_close(linear_cross_entropy(e, c, t),
                               _lce_reference(e, c, t).float(), atol=1e-5, rtol=1e-5)
    # all positions ignored: mean is NaN like F.cross_entropy / CCE, sum is 0
    t_all = torch.full((10,), -100)
    assert torch.isnan(linear_cross_entropy(e, c, t_all))
    assert float(linear_cross_entropy(e, c, t_all, reduction="sum")) == 0.0


def test_cce_bad_inputs():
    e = torch.randn(2, 5, 8)
    c = torch.randn(20, 8)
    t = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(e, c, t, reduction="avg")
    with pytest.raises(ValueError, match="shift"):
        linear_cross_entropy(e, c, t, shift=-1)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(e, c, t[:, :-1])
    with pytest.raises(ValueError, match="c must have shape"):
        linear_cross_entropy(e, c[:, :-1], t)
    with pytest.raises(ValueError, match="shift needs"):
        linear_cross_entropy(e[0, 0], c, t[0, 0], shift=1)
    with pytest.raises(ValueError, match="filter_eps"):
        linear_cross_entropy(e, c, t, filter_eps="low")
    with pytest.raises(TypeError):
        linear_cross_entropy(e, c, t, -100)  # everything after targets is keyword-only


# ============================================================================ TRL wiring
def _tiny_trainer(tmp_path, loss_type="grpo", beta=0.0, bf16=False, **cfg_kw):
    pytest.importorskip("trl")
    pytest.importorskip("tokenizers")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, attention_bias=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if beta:
        model.save_pretrained(tmp_path / "tiny")  # the reference model is re-created from this path
        model = LlamaForCausalLM.from_pretrained(tmp_path / "tiny")
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"] * 4})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, report_to=[], use_cpu=True, loss_type=loss_type, beta=beta,
                      bf16=bf16, logging_steps=1, max_steps=1, save_strategy="no", **cfg_kw)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                          args=args, train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call compute_loss directly
    return trainer


def _trl_inputs(trainer, seed=0, B=4, P=3, C=5):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, 64, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    prompt_ids[0, 0] = 0
    completion_ids = torch.randint(2, 64, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_ids[1, 3:] = 0
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  num_items_in_batch=completion_mask.sum().float())
    with torch.no_grad():
        lp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), C)
    inputs["old_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    if trainer.beta:
        inputs["ref_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    return inputs


def _trl_loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("loss_type,beta,bf16", [("grpo", 0.0, False), ("dapo", 0.0, False), ("sapo", 0.0, False),
                                                 ("bnpo", 0.05, False), ("cispo", 0.0, True)])
def test_trl_patch_routes_through_upg(tmp_path, monkeypatch, loss_type, beta, bf16):
    """fp32: same loss and gradients as TRL's own kernel to float32 rounding; bf16 autocast (TRL's default on
    CPU and GPU): both kernels round the logits tiles to bf16, so gradients agree to bf16 rounding only."""
    from upg_kernels.integrations import trl as upg_trl

    trainer = _tiny_trainer(tmp_path, loss_type=loss_type, beta=beta, bf16=bf16)
    trainer.model.train()
    inputs = _trl_inputs(trainer)
    l_trl, g_trl = _trl_loss_and_grads(trainer, inputs)

    calls = []
    real = upg_trl.token_logprobs
    monkeypatch.setattr(upg_trl, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert upg_trl.patch_grpo_trainer(trainer) is trainer and upg_trl.is_patched(trainer)
    upg_trl.patch_grpo_trainer(trainer)  # idempotent
    l_upg, g_upg = _trl_loss_and_grads(trainer, inputs)
    assert calls, "the patched trainer did not call upg_kernels.token_logprobs"
    tag = " (bf16 autocast)" if bf16 else ""
    _close("trl loss patched vs TRL" + tag, l_upg, l_trl, 2e-6, 1e-2 if bf16 else 2e-6)
    assert g_upg.keys() == g_trl.keys()
    for k in g_trl:
        _close("trl grads patched vs TRL" + tag, g_upg[k], g_trl[k], 1e-6, 2e-2 if bf16 else 2e-5)
    # only this trainer is patched: TRL's module-level kernel is left as it was
    import trl.trainer.utils as trl_utils
    assert trl_utils._ChunkedLogProbFunction.__name__ == "ChunkedLogProbFunction"
    upg_trl.unpatch_grpo_trainer(trainer)
    assert not upg_trl.is_patched(trainer)
    n = len(calls)
    _trl_loss_and_grads(trainer, inputs)
    assert len(calls) == n


def test_trl_loss_equals_fused_linear_grpo_loss(tmp_path):
    """TRL's GRPO loss on a tiny model == FusedLinearGRPOLoss (and Liger) on the model's last hidden states."""
    trainer = _tiny_trainer(tmp_path, loss_type="grpo", beta=0.0, epsilon_high=0.28)
    from upg_kernels.integrations import patch_grpo_trainer

    patch_grpo_trainer(trainer)
    trainer.model.train()
    inputs = _trl_inputs(trainer, seed=1)
    l_trl = trainer.compute_loss(trainer.model, inputs).detach()

    model = trainer.model
    C = inputs["completion_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    hid = model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, -C - 1:-1]
    head = model.get_output_embeddings()
    ctor = dict(beta=0.0, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28,
                temperature=trainer.temperature, use_ref_model=False)
    fwd = dict(old_per_token_logps=inputs["old_per_token_logps"])
    ours, _ = FusedLinearGRPOLoss(**ctor)(hid, head.weight, inputs["completion_ids"],
                                         inputs["completion_mask"], inputs["advantages"], head.bias, **fwd)
    _close("trl loss vs FusedLinearGRPOLoss", ours.detach(), l_trl, 2e-6, 2e-6)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return
    lig, _ = LigerFusedLinearGRPOLoss(**ctor, compiled=False)(
        hid, head.weight, inputs["completion_ids"], inputs["completion_mask"], inputs["advantages"], head.bias,
        **fwd)
    _close("trl loss vs Liger", lig.detach(), l_trl, 2e-6, 2e-6)


def test_trl_patch_legacy_liger_loss():
    """TRL < 1.0 with use_liger_loss=True keeps a LigerFusedLinearGRPOLoss at trainer.liger_grpo_loss."""
    pytest.importorskip("trl")
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from upg_kernels.integrations import patch_grpo_trainer, unpatch_grpo_trainer

    class LegacyTrainer:  # minimal stand-in: what the patch touches on such a trainer
        def __init__(self):
            self.liger_grpo_loss = LigerFusedLinearGRPOLoss(beta=0.0, loss_type="bnpo", epsilon_high=0.28,
                                                            use_ref_model=False, temperature=0.9)

    tr = LegacyTrainer()
    orig = tr.liger_grpo_loss
    patch_grpo_trainer(tr)
    assert isinstance(tr.liger_grpo_loss, FusedLinearGRPOLoss)
    assert tr.liger_grpo_loss.loss_type == "bnpo" and tr.liger_grpo_loss.temperature == 0.9
    unpatch_grpo_trainer(tr)
    assert tr.liger_grpo_loss is orig


def test_trl_patch_rejects_non_trainer():
    pytest.importorskip("trl")
    from upg_kernels.integrations import patch_grpo_trainer

    with pytest.raises(TypeError, match="GRPOTrainer"):
        patch_grpo_trainer(object())


@pytest.mark.parametrize("loss_mode", [False, True])
def test_trl_patched_trainer_trains(tmp_path, monkeypatch, loss_mode):
    """End to end: a patched GRPOTrainer generates, scores, and takes an optimizer step through upg-kernels."""
    import upg_kernels.ops
    from upg_kernels.integrations import trl as upg_trl

    trainer = _tiny_trainer(tmp_path, loss_type="dapo", beta=0.0)
    calls = []
    real = upg_kernels.ops.token_logprobs_op
    monkeypatch.setattr(upg_kernels.ops, "token_logprobs_op", lambda *a, **k: calls.append(1) or real(*a, **k))
    upg_trl.patch_grpo_trainer(trainer, loss=loss_mode)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert calls
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(map(lambda h: torch.isfinite(torch.tensor(float(h["loss"]))), logs))


def test_liger_parity_triton_backend():
    """The same drop-in on the Triton kernels (under TRITON_INTERPRET=1 on CPU)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from upg_kernels._backend import interpreter_on

    if not (torch.cuda.is_available() or interpreter_on()):
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    case = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in _grpo_case(21, B=3, T=5).items()}
    ctor = dict(beta=0.1, loss_type="dapo", epsilon_high=0.28, temperature=0.8)
    fwd = dict(old_per_token_logps=case["old"], ref_per_token_logps=case["ref"], vllm_is_ratio=case["is_tok"])
    l_ref, m_ref, g_ref = _run_grpo(LigerFusedLinearGRPOLoss, case, dict(ctor, compiled=False), fwd)
    l_our, m_our, g_our = _run_grpo(FusedLinearGRPOLoss, case, dict(ctor, backend="triton"), fwd)
    _close("loss (triton)", l_our, l_ref, 2e-5, 2e-5)
    for a, r in zip(m_our, m_ref):
        _close("metric (triton)", a, r, 2e-5, 2e-5)
    for a, r in zip(g_our, g_ref):
        _close("grad (triton)", a, r, 2e-5, 1e-4)


def test_liger_parity_frozen_lm_head_and_tensor_num_items():
    """A frozen lm_head (LoRA/PEFT: weight without grad) and num_items_in_batch given as a tensor."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    case = _grpo_case(31)
    out = []
    for cls, extra in ((LigerFusedLinearGRPOLoss, dict(compiled=False)), (FusedLinearGRPOLoss, {})):
        x = case["hidden"].clone().requires_grad_(True)
        loss, metrics = cls(beta=0.0, loss_type="cispo", epsilon_high=2.0, use_ref_model=False, **extra)(
            x, case["weight"], case["ids"], case["mask"], case["adv"], case["bias"],
            old_per_token_logps=case["old"], num_items_in_batch=torch.tensor(17))
        loss.backward()
        out.append((loss.detach(), metrics, x.grad))
    _close("loss", out[1][0], out[0][0], 2e-5, 2e-5)
    _close("metric clip_ratio", out[1][1][0], out[0][1][0], 2e-5, 2e-5)
    _close("grad input", out[1][2], out[0][2], 2e-5, 1e-4)


@pytest.mark.parametrize("loss_type,beta,cfg_kw,gas", [
    ("grpo", 0.0, dict(), 1),
    ("bnpo", 0.05, dict(epsilon_high=0.28, use_bias_correction_kl=False), 2),
    ("dr_grpo", 0.0, dict(importance_sampling_level="sequence"), 1),
    ("dapo", 0.0, dict(delta=1.5, epsilon_high=0.28), 2),
    ("cispo", 0.0, dict(epsilon_high=1.5), 1),
    ("sapo", 0.05, dict(use_bias_correction_kl=False), 1),
    ("grpo", 0.05, dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2,
                        use_bias_correction_kl=False), 1),
    # TRL 1.16's default use_bias_correction_kl=True, token and sequence level
    ("grpo", 0.05, dict(), 1),
    ("dapo", 0.05, dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2), 2),
    # luspo / vespo (padded completions: TRL masks before aggregating, as we do)
    ("luspo", 0.05, dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2), 2),
    ("luspo", 0.0, dict(), 1),
    ("vespo", 0.05, dict(), 1),
    ("vespo", 0.0, dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5), 2),
])
def test_trl_loss_mode_matches_trl(tmp_path, monkeypatch, loss_type, beta, cfg_kw, gas):
    """patch_grpo_trainer(loss=True): TRL's loss, gradients and logged metrics, computed by unified_policy_loss."""
    import upg_kernels.losses as upg_losses
    from upg_kernels.integrations import trl as upg_trl

    calls = []
    real = upg_losses.unified_policy_loss
    monkeypatch.setattr(upg_losses, "unified_policy_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = _tiny_trainer(tmp_path, loss_type=loss_type, beta=beta, **cfg_kw)
    trainer.current_gradient_accumulation_steps = gas
    trainer.model.train()
    inputs = _trl_inputs(trainer, seed=2)
    trainer._metrics["train"].clear()
    l_trl, g_trl = _trl_loss_and_grads(trainer, inputs)
    m_trl = {k: list(v) for k, v in trainer._metrics["train"].items()}
    upg_trl.patch_grpo_trainer(trainer, loss=True)
    trainer._metrics["train"].clear()
    l_upg, g_upg = _trl_loss_and_grads(trainer, inputs)
    m_upg = {k: list(v) for k, v in trainer._metrics["train"].items()}
    assert calls, "loss=True did not go through unified_policy_loss"
    _close("trl loss mode: loss", l_upg, l_trl, 2e-6, 2e-5)
    assert g_upg.keys() == g_trl.keys()
    for k in g_trl:
        _close("trl loss mode: grads", g_upg[k], g_trl[k], 1e-6, 2e-5)
    assert m_upg.keys() == m_trl.keys(), (sorted(m_upg), sorted(m_trl))
    for k in m_trl:
        _close("trl loss mode: metrics", torch.tensor(m_upg[k]), torch.tensor(m_trl[k]), 2e-6, 2e-5)
    upg_trl.unpatch_grpo_trainer(trainer)
    assert "_compute_loss" not in vars(trainer)


@pytest.mark.parametrize("cfg_kw,match", [
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
])
def test_trl_loss_mode_rejects_uncovered_options(tmp_path, cfg_kw, match):
    from upg_kernels.integrations import patch_grpo_trainer

    beta = cfg_kw.pop("beta", 0.0)
    trainer = _tiny_trainer(tmp_path, beta=beta, **cfg_kw)
    with pytest.raises(NotImplementedError, match=match):
        patch_grpo_trainer(trainer, loss=True)


# ---------------------------------------------------------------- exact normalisation (TRL and Liger drop-ins)
# each TRL loss type with the settings its matching test above uses (TRL's config checks)
_TRL_TYPES = {"grpo": {}, "bnpo": {}, "dr_grpo": {}, "dapo": dict(epsilon_high=0.28), "cispo": dict(epsilon_high=1.5),
              "sapo": {}, "luspo": dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2),
              "vespo": {}}


def _generation_batch(trainer, B=8):
    """A generation batch as TRL's _generate_and_score_completions returns it: uneven completion lengths and a
    truncated rollout (all-zero mask), advantages, old log-probs and num_items_in_batch (the token count)."""
    inputs = _trl_inputs(trainer, seed=5, B=B, C=6)
    m = inputs["completion_mask"]
    for i in range(B):
        m[i, 1 + (3 * i) % 6:] = 0    # lengths 1..6, unevenly spread
    m[2] = 0                          # truncated rollout, filtered out
    inputs["completion_ids"] = inputs["completion_ids"] * m
    inputs["num_items_in_batch"] = m.sum().float()
    return inputs


def _accumulated_grads(trainer, batch, gas):
    """One optimizer step's accumulated gradients: TRL's own _prepare_inputs buffers, shuffles and splits the
    generation batch into ``gas`` micro-batches (steps_per_generation = gas), each goes through compute_loss."""
    trainer.args.gradient_accumulation_steps = trainer.args.steps_per_generation = gas
    trainer.current_gradient_accumulation_steps = gas
    trainer._step, trainer._buffered_inputs = 0, None
    trainer._generate_and_score_completions = lambda _: {k: v.clone() for k, v in batch.items()}
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    for _ in range(gas):
        inputs = trainer._prepare_inputs(None)
        assert len(trainer._buffered_inputs) == gas
        assert inputs["completion_ids"].shape[0] == batch["completion_ids"].shape[0] // gas
        trainer.compute_loss(trainer.model, inputs).backward()
        trainer._step += 1
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", list(_TRL_TYPES))
def test_trl_global_normalization_independent_of_accumulation(tmp_path, loss_type):
    """patch_grpo_trainer(loss=True, normalization="global"): the step's gradient with 2 or 4 accumulation
    micro-batches equals the whole generation batch in one call, which is TRL's own loss of that batch
    (gas 1); with TRL's normalisation bnpo's does not (each micro-batch divides by its own tokens)."""
    from upg_kernels.integrations import trl as upg_trl

    trainer = _tiny_trainer(tmp_path, loss_type=loss_type, **_TRL_TYPES[loss_type])
    trainer.model.train()
    batch = _generation_batch(trainer)
    g_trl = _accumulated_grads(trainer, batch, 1)          # TRL's own _compute_loss, one call
    upg_trl.patch_grpo_trainer(trainer, loss=True, normalization="global")
    for gas in (1, 2, 4):
        g = _accumulated_grads(trainer, batch, gas)
        assert g.keys() == g_trl.keys()
        for k in g_trl:
            _close(f"trl global, gas {gas} vs TRL gas 1", g[k], g_trl[k], 1e-7, 2e-5)
    upg_trl.unpatch_grpo_trainer(trainer)
    assert "_prepare_inputs" not in vars(trainer) and "_compute_loss" not in vars(trainer)
    if loss_type == "bnpo":   # the test can fail: TRL's per-micro-batch token mean depends on gas
        upg_trl.patch_grpo_trainer(trainer, loss=True)
        g = _accumulated_grads(trainer, batch, 2)
        diff = max(float((g[k] - g_trl[k]).abs().max() / g_trl[k].abs().max()) for k in g_trl)
        assert diff > 1e-2, diff


def test_trl_repatch_with_other_options_is_refused(tmp_path):
    """patch_grpo_trainer is idempotent for the same options; a second call with other options (loss=True,
    normalization="global" on a kernel-swap patch) raises instead of silently keeping the first patch."""
    from upg_kernels.integrations import patch_grpo_trainer, unpatch_grpo_trainer

    trainer = _tiny_trainer(tmp_path)
    patch_grpo_trainer(trainer)
    state = trainer._upg_kernels_patch
    assert patch_grpo_trainer(trainer) is trainer and trainer._upg_kernels_patch is state   # same options
    with pytest.raises(ValueError, match="already patched"):
        patch_grpo_trainer(trainer, loss=True, normalization="global")
    with pytest.raises(ValueError, match="already patched"):
        patch_grpo_trainer(trainer, backend="torch")
    assert trainer._upg_kernels_patch is state and "_compute_loss" not in vars(trainer)
    unpatch_grpo_trainer(trainer)
    patch_grpo_trainer(trainer, loss=True, normalization="global")
    assert "_compute_loss" in vars(trainer) and "_prepare_inputs" in vars(trainer)


def test_trl_global_normalization_patched_mid_generation_batch(tmp_path):
    """patch_grpo_trainer(normalization="global") on a trainer that already buffered a generation batch
    (patched between two steps of the same batch: a resumed run, a notebook): the next micro-batch comes
    from that buffer without a new generation; its totals are counted then, and the step's gradient equals
    that of a trainer patched from the start (it raised "does not come from the trainer's buffered
    generation batch")."""
    from upg_kernels.integrations import trl as upg_trl

    trainer = _tiny_trainer(tmp_path, loss_type="bnpo")
    trainer.model.train()
    batch = _generation_batch(trainer)
    upg_trl.patch_grpo_trainer(trainer, loss=True, normalization="global")
    g_ref = _accumulated_grads(trainer, batch, 2)            # patched from the start: micro-batches 0, 1
    ref_second = {}
    trainer.model.zero_grad(set_to_none=True)
    trainer._step = 1
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(None)).backward()   # micro-batch 1 only
    ref_second = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    upg_trl.unpatch_grpo_trainer(trainer)

    trainer.model.zero_grad(set_to_none=True)
    trainer._step, trainer._buffered_inputs = 0, None
    torch.manual_seed(0)
    trainer._prepare_inputs(None)                             # unpatched: buffers the generation batch
    trainer._step = 1
    upg_trl.patch_grpo_trainer(trainer, loss=True, normalization="global")
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(None)).backward()
    g = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert g.keys() == ref_second.keys() and g_ref
    for k in ref_second:
        _close("trl global, patched mid-batch", g[k], ref_second[k], 1e-7, 1e-5)


_DDP_TYPES = ("bnpo", "dr_grpo", "dapo")


def _trl_ddp_worker(rank, world, tmp, gas):
    """One rank: half of the generation batch (TRL's num_items_in_batch is the global count), ``gas``
    micro-batches, the gradients averaged over the ranks as DDP does."""
    import pathlib

    import torch.distributed as dist

    from upg_kernels.integrations import patch_grpo_trainer

    out = {}
    for loss_type in _DDP_TYPES:
        trainer = _tiny_trainer(pathlib.Path(tmp) / f"{loss_type}{rank}", loss_type=loss_type,
                                **_TRL_TYPES[loss_type])
        assert trainer.accelerator.num_processes == world
        trainer.model.train()
        batch = _generation_batch(trainer)
        rows = batch["completion_ids"].shape[0] // world
        mine = {k: (v[rank * rows:(rank + 1) * rows] if v.dim() else v) for k, v in batch.items()}
        patch_grpo_trainer(trainer, loss=True, normalization="global")
        grads = _accumulated_grads(trainer, mine, gas)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        out[loss_type] = {k: g.tolist() for k, g in grads.items()}
    return out


def test_trl_global_normalization_independent_of_processes(tmp_path):
    """2 gloo processes (accelerate sees WORLD_SIZE=2), each with half of the generation batch in 2
    accumulation micro-batches of 2 rows: the DDP-averaged gradient equals TRL's own loss of the whole batch on one
    process (bnpo, dr_grpo, dapo)."""
    pytest.importorskip("trl")
    from _spawn import run_world

    ref = {}
    for loss_type in _DDP_TYPES:
        trainer = _tiny_trainer(tmp_path / loss_type, loss_type=loss_type, **_TRL_TYPES[loss_type])
        trainer.model.train()
        ref[loss_type] = _accumulated_grads(trainer, _generation_batch(trainer), 1)
    res = run_world(_trl_ddp_worker, 2, str(tmp_path), 2)
    for loss_type in _DDP_TYPES:
        for k, g in ref[loss_type].items():
            for r in res:
                _close("trl global, 2 processes, gas 2", torch.tensor(r[loss_type][k]), g, 1e-7, 2e-5)


def test_trl_global_normalization_bad_settings(tmp_path):
    from upg_kernels.integrations import patch_grpo_trainer

    trainer = _tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="normalization must be one of"):
        patch_grpo_trainer(trainer, loss=True, normalization="exact")
    with pytest.raises(ValueError, match="needs loss=True"):
        patch_grpo_trainer(trainer, normalization="global")
    trainer.args.gradient_accumulation_steps, trainer.args.steps_per_generation = 2, 3
    with pytest.raises(NotImplementedError, match="multiple of gradient_accumulation_steps"):
        patch_grpo_trainer(trainer, loss=True, normalization="global")
    assert not vars(trainer).get("_upg_kernels_patch") and "_compute_loss" not in vars(trainer)
    trainer.args.gradient_accumulation_steps = trainer.args.steps_per_generation = 1
    patch_grpo_trainer(trainer, loss=True, normalization="global")
    trainer.model.train()
    with pytest.raises(RuntimeError, match="buffered generation batch"):
        trainer.compute_loss(trainer.model, _trl_inputs(trainer))   # not from _prepare_inputs


@pytest.mark.parametrize("loss_type,level", [(lt, "token") for lt in _TRL_TYPES] + [("grpo", "sequence"),
                                                                                      ("luspo", "sequence")])
def test_liger_totals_micro_batches_add_up(loss_type, level):
    """FusedLinearGRPOLoss(..., totals=batch_totals(masks)): uneven micro-batches' losses and gradients add up to
    the whole batch's call, which is Liger's own normalisation of that batch (luspo: TRL's masked form,
    padded_luspo=False); with world_size=2 in the totals the loss is doubled (DDP's mean compensated)."""
    from upg_kernels import BatchTotals, batch_totals

    case = _grpo_case(41, B=7, T=6, dtype=torch.float64)
    case["mask"][5, 2:] = 0
    ctor = dict(beta=0.1, loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28,
                max_completion_length=6, padded_luspo=False)
    fwd = dict(old_per_token_logps=case["old"], ref_per_token_logps=case["ref"], vllm_is_ratio=case["is_tok"])
    l_whole, _, g_whole = _run_grpo(FusedLinearGRPOLoss, case, ctor, fwd)
    cuts = [slice(0, 1), slice(1, 4), slice(4, 7)]
    totals = batch_totals([case["mask"][s] for s in cuts])
    x = case["hidden"].clone().requires_grad_(True)
    w = case["weight"].clone().requires_grad_(True)
    b = case["bias"].clone().requires_grad_(True)
    mod = FusedLinearGRPOLoss(**ctor)
    total = 0.0
    for s in cuts:
        loss, _ = mod(x[s], w, case["ids"][s], case["mask"][s], case["adv"][s], b,
                      **{k: v[s] for k, v in fwd.items()}, totals=totals)
        loss.backward()
        total = total + loss.detach()
    _close("liger totals: micro-batch losses", total, l_whole, 1e-6, 1e-5)
    for a, r in zip((x.grad, w.grad, b.grad), g_whole):
        _close("liger totals: micro-batch grads", a, r, 1e-7, 1e-5)
    l2, _ = mod(case["hidden"], case["weight"], case["ids"], case["mask"], case["adv"], case["bias"], **fwd,
                totals=BatchTotals(**{**vars(totals), "world_size": 2}))
    _close("liger totals: world_size 2", l2.detach(), 2 * l_whole, 1e-6, 1e-5)
    with pytest.raises(ValueError, match="not both"):
        mod(case["hidden"], case["weight"], case["ids"], case["mask"], case["adv"], case["bias"], **fwd,
            totals=totals, num_items_in_batch=10)
