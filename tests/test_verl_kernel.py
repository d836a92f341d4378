"""``impl_backend=upg`` on a tiny, locally built Qwen2 / Llama against verl 0.9.1's own torch backend.

Real verl code: ``apply_monkey_patch`` (what verl's FSDP engine calls) patches the models; the torch backend
is verl's ``FusedLinearForPPO``. ``.ci/run`` runs this file in ``.venv-verl`` (verl 0.9.1 and its
transformers pin) with ``UPG_REQUIRE_VERL=1``, where a missing verl is an error, not a skip.
"""
import os

import pytest
import torch

if os.environ.get("UPG_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl", reason="verl 0.9.1 is not installed in this venv; .ci/run runs these tests "
                                       "in .venv-verl")

import transformers  # noqa: E402
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: E402

import upg_kernels.integrations.verl as upg_verl  # noqa: E402
from upg_kernels.integrations.verl import kernel as upg_kernel  # noqa: E402

pytestmark = pytest.mark.verl
V = 61  # not a multiple of any tile


def _tiny(arch):
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       tie_word_embeddings=False)
        base = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        base = transformers.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    return cfg, base


def _patched(arch, backend, state=None):
    """A model whose class is patched by verl's apply_monkey_patch with ``backend`` (one class per backend:
    verl patches the class)."""
    cfg, base = _tiny(arch)
    cls = type(f"{base.__name__}_{backend}", (base,), {})
    torch.manual_seed(0)
    model = cls(cfg).float()
    if state is not None:
        model.load_state_dict(state)
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend=backend)
    return model


def _run(model, ids, mask, temperature):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, temperature=temperature, return_dict=True,
                use_cache=False)
    return out.log_probs.reshape(ids.shape), out.entropy.reshape(ids.shape)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_upg_backend_matches_verl_torch_backend(arch, temperature):
    ref = _patched(arch, "torch")
    ours = _patched(arch, upg_kernel.UPG_BACKEND, ref.state_dict())
    assert getattr(type(ours).forward, "_upg_wrapped", None) is not None, "upg backend not applied"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    w_lp = torch.randn(3, 9, generator=g)
    w_ent = torch.randn(3, 9, generator=g)
    res = []
    for model in (ref, ours):
        model.zero_grad()
        lp, ent = _run(model, ids, mask, temperature)
        ((w_lp * lp).sum() + (w_ent * ent).sum()).backward()
        res.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, e0, g0), (lp1, e1, g1) = res
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert g1["lm_head.weight"].abs().sum() > 0


def test_upg_backend_goes_through_our_kernel(monkeypatch):
    calls = []
    real = upg_kernel.token_logprobs

    def spy(*a, **k):
        calls.append(k.get("return_entropy"))
        return real(*a, **k)

    monkeypatch.setattr(upg_kernel, "token_logprobs", spy)
    model = _patched("qwen2", upg_kernel.UPG_BACKEND)
    ids = torch.randint(0, V, (2, 5))
    _run(model, ids, torch.ones_like(ids), 1.0)
    assert calls == [True]
    with upg_kernel.entropy_wanted(False):   # what the engine sets for calculate_entropy=False
        out = model(input_ids=ids, temperature=1.0, return_dict=True, use_cache=False)
    assert calls == [True, False] and out.entropy is None and out.log_probs.shape == (10,)


def test_verl_triton_backend_untouched():
    """The dispatcher calls verl's own kernel outside an upg model's forward."""
    import verl.utils.kernel.linear_cross_entropy as lce

    assert lce.linear_cross_entropy._upg_original is not None
    seen = []
    orig = lce.linear_cross_entropy._upg_original
    try:
        lce.linear_cross_entropy._upg_original = None  # not used: the closure holds the original
        h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
        upg_kernel._IN_UPG_FORWARD.set(True)
        lp, ent = lce.linear_cross_entropy(h, w, t, 1.0, "none")
        seen.append(lp.shape)
    finally:
        upg_kernel._IN_UPG_FORWARD.set(False)
        lce.linear_cross_entropy._upg_original = orig
    assert seen == [(4,)]
    ref = torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-6)


def test_other_backends_still_skip_or_apply():
    """Unknown names are still skipped by verl (the wrapper only adds 'upg')."""
    cfg, base = _tiny("qwen2")
    cls = type("Qwen2_unknown", (base,), {})
    model = cls(cfg)
    before = cls.forward
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="nope")
    assert cls.forward is before
    assert upg_verl.UPG_BACKEND == "upg"
