"""The HF rollout engine's sampler log-probs: computed on the device one step at a time (no
``output_logits`` / ``output_scores``), equal to a direct full-logits computation."""
from types import SimpleNamespace

import pytest
import torch

from upg_trainer.rollout.hf_engine import HFEngine

V, EOS, PAD = 48, 1, 0


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama built from a config (no download), EOS made likely so that rows finish early."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)                   # peaked distributions (top-p really truncates)
        model.lm_head.weight[EOS] = model.model.norm.weight.detach() * 0.5  # EOS fairly likely
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    return model, tok


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def direct_logprobs(model, prompt, completion, temperature):
    """log_softmax(logits / T) of the completion tokens from one full forward of prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8), (0.0, 1.0)])
def test_logprobs_equal_full_logits(tiny, temperature, top_p):
    model, tok = tiny
    eng = HFEngine(model, tok, batch_size=4)          # 9 sequences: batches of 4, 4, 1
    ro = eng.generate(PROMPTS, n=3, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=1)
    assert len(ro) == 9
    if temperature > 0:     # early-finishing rows next to rows that run to the length limit
        assert any(r.finish_reason == "stop" and len(r.completion_ids) < 10 for r in ro)
        assert any(r.finish_reason == "length" for r in ro)
    for r in ro:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert len(r.logprobs) == len(r.completion_ids)        # nothing for padding after EOS
        assert (r.finish_reason == "stop") == (r.completion_ids[-1] == EOS)
        want = direct_logprobs(model, r.prompt_ids, r.completion_ids, temperature or 1.0)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=2e-5, rtol=1e-5)


def test_same_tokens_and_logprobs_as_output_logits(tiny):
    """Same seed, same samples, same log-probs as the former ``output_logits=True`` implementation
    (log_softmax(raw logits / T), top-p not renormalised)."""
    from transformers import GenerationConfig
    model, tok = tiny
    T, P = 0.7, 0.8
    ro = HFEngine(model, tok, batch_size=8).generate([PROMPTS[0]], n=4, max_new_tokens=8, temperature=T,
                                                     top_p=P, seed=5)
    gc = GenerationConfig(do_sample=True, temperature=T, top_p=P, top_k=0, max_new_tokens=8, pad_token_id=PAD,
                          eos_token_id=[EOS], return_dict_in_generate=True, output_logits=True)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        res = model.generate(input_ids=torch.tensor([PROMPTS[0]] * 4),
                             attention_mask=torch.ones(4, len(PROMPTS[0]), dtype=torch.long), generation_config=gc)
    logp = torch.log_softmax(torch.stack(res.logits, 1).float() / T, -1)
    for i, r in enumerate(ro):
        n = len(r.completion_ids)
        assert r.completion_ids == res.sequences[i, len(PROMPTS[0]):len(PROMPTS[0]) + n].tolist()
        want = logp[i, torch.arange(n), torch.tensor(r.completion_ids)]
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-6, rtol=1e-6)


def _spy(model, monkeypatch):
    calls = []
    real = model.generate

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(model, "generate", spy)
    return calls


@pytest.mark.parametrize("return_logprobs", [True, False])
def test_generate_never_keeps_all_logits(tiny, monkeypatch, return_logprobs):
    model, tok = tiny
    calls = _spy(model, monkeypatch)
    eng = HFEngine(model, tok, return_logprobs=return_logprobs)
    ro = eng.generate(PROMPTS, n=2, max_new_tokens=5, temperature=0.9, seed=0)
    ro += eng.generate(PROMPTS[:1], n=1, max_new_tokens=5, temperature=0.0)
    assert len(calls) == 2
    for kw in calls:
        assert not kw.get("output_logits") and not kw.get("output_scores")
        gc = kw["generation_config"]
        assert not gc.output_logits and not gc.output_scores and not gc.return_dict_in_generate
        assert ("logits_processor" in kw) == return_logprobs
    for r in ro:
        assert (r.logprobs is not None) == return_logprobs
        if return_logprobs:
            assert len(r.logprobs) == len(r.completion_ids)
