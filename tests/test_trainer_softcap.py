"""Final-logit softcapping (Gemma-2 style) through every log-prob / loss call; logit scales refused."""
import math

import pytest
import torch

from trainer_fakes import spy  # noqa: F401  (spy: a fixture)
from upg_trainer.config import build_config
from upg_trainer.samples import Sample
from upg_trainer.model import check_fused_logprobs, get_head, load_model_and_tokenizer
from upg_trainer.task import load_tokenizer
from upg_trainer.trainer import Trainer

CAP = 5.0
FAST = {"output.progress": "false", "output.plots": "false", "data.eval_path": "", "data.num_train": "4",
        "train.batch_size": "2", "rollout.n": "2", "rollout.max_new_tokens": "6", "output.save_every": "0",
        "rollout.temperature": "0.8"}


def tiny_gemma2(tok, seed=0):
    """A random 2-layer Gemma-2 (final_logit_softcapping=5), built from a config: no download."""
    from transformers import AutoModelForCausalLM, Gemma2Config
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                       sliding_window=16, final_logit_softcapping=CAP, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # larger logits, so that the cap really bends them
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def test_gemma2_fused_logprobs_match_model_logits():
    tok = load_tokenizer()
    model = tiny_gemma2(tok).eval()
    assert get_head(model).softcap == CAP
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    from upg_kernels import token_logprobs
    from upg_trainer.model import hidden_states
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.float()
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        h = hidden_states(model, ids[:, :-1])
        w = model.get_output_embeddings().weight
        got = token_logprobs(h, w, ids[:, 1:], softcap=CAP)
        without = token_logprobs(h, w, ids[:, 1:])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (without - want).abs().max() > 0.1   # the cap matters for this model
    assert check_fused_logprobs(model, CAP) < 1e-4
    with pytest.raises(ValueError, match="differ from log_softmax"):
        check_fused_logprobs(model, None)


def test_gemma2_trains_with_softcap(tmp_path, spy):
    tok = load_tokenizer()
    model = tiny_gemma2(tok)
    tr = Trainer(build_config("hpt", None, dict(FAST, **{"output.dir": str(tmp_path / "g"),
                                                          "loss.overrides": "{kl_coef: 0.05}"})),
                 model=model, tokenizer=tok)
    assert tr.softcap == CAP and tr.ref_softcap == CAP
    m = tr.train_step()            # real rollouts from HF generate (which applies the cap itself)
    assert math.isfinite(m["loss"])
    assert all(c["softcap"] == CAP for c in spy)
    tr2 = Trainer(build_config("sft", None, dict(FAST, **{"output.dir": str(tmp_path / "s")})),
                  model=tiny_gemma2(tok), tokenizer=tok)
    before = [p.detach().clone() for p in tr2.lm.parameters()]
    assert math.isfinite(tr2.train_step()["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, tr2.lm.parameters()))


def test_sampler_logprobs_match_trainer_with_softcap(tmp_path):
    """The HF engine's sampler log-probs (from generate's logits, capped by the model) equal the trainer's
    fused log-probs of the same tokens (softcap, then temperature)."""
    tok = load_tokenizer()
    tr = Trainer(build_config("grpo", None, dict(FAST, **{"output.dir": str(tmp_path / "g")})),
                 model=tiny_gemma2(tok), tokenizer=tok)
    prompts = [tr.prompt_ids(r) for r in tr.train_rows[:2]]
    tr.engine.return_logprobs = True   # the trainer asks for them only with loss.rollout_is
    ro = tr.engine.generate(prompts, n=2, max_new_tokens=6, temperature=0.8, seed=3)
    mb, extra = tr.method.micro([Sample(r.prompt_ids, r.completion_ids, logprobs=r.logprobs) for r in ro])
    tr.fill_logprobs([(mb, extra)], "old_logprobs", tr.model, tr.softcap)
    for i, r in enumerate(ro):
        torch.testing.assert_close(extra["old_logprobs"][i, :len(r.logprobs)], torch.tensor(r.logprobs),
                                   atol=1e-4, rtol=1e-4)


def test_logit_scale_refused(tmp_path):
    model, tok, _ = load_model_and_tokenizer("embedded")
    model.config.logit_scale = 0.0625   # Cohere-style logits * logit_scale: not supported
    with pytest.raises(ValueError, match="scales its logits"):
        Trainer(build_config("sft", None, dict(FAST, **{"output.dir": str(tmp_path / "o")})),
                model=model, tokenizer=tok)
