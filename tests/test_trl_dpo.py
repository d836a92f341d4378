"""``patch_dpo_trainer``: TRL 1.16's DPOTrainer with its per-token log-probs from upg-kernels.

A tiny Llama (random init, no download) and a toy preference set: the patched trainer gives TRL's loss,
gradients and logged metrics, a real ``train()`` step gives the same updated weights, the lm_head's forward is
never called, and the vocab-sized work goes through :func:`upg_kernels.token_logprobs`.
"""
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("tokenizers")

from upg_kernels.integrations import trl as upg_trl  # noqa: E402


def _dpo_trainer(tmp_path, loss_type="sigmoid", max_steps=1, **cfg_kw):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(59)}}   # V = 61
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")  # the reference model is re-created from a path
    model = LlamaForCausalLM.from_pretrained(tmp_path / "tiny")
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"],
                            "chosen": [" w11 w12", " w13", " w14 w15 w16", " w17 w18"],
                            "rejected": [" w20", " w21 w22 w23", " w24", " w25 w26 w27 w28"]})
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     bf16=False, logging_steps=1, max_steps=max_steps, save_strategy="no", loss_type=loss_type,
                     learning_rate=1e-2, beta=0.1, **cfg_kw)
    return DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


def _loss_grads_metrics(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_patch_same_loss_grads_metrics(tmp_path, monkeypatch, loss_type):
    trainer = _dpo_trainer(tmp_path, loss_type=loss_type)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    l_trl, g_trl, m_trl = _loss_grads_metrics(trainer, batch)

    calls, head_calls = [], []
    real = upg_trl.token_logprobs
    monkeypatch.setattr(upg_trl, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    hook = trainer.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    assert upg_trl.patch_dpo_trainer(trainer) is trainer and upg_trl.is_patched(trainer)
    l_upg, g_upg, m_upg = _loss_grads_metrics(trainer, batch)
    hook.remove()
    assert calls, "the patched DPOTrainer did not call upg_kernels.token_logprobs"
    assert head_calls == [], "lm_head's forward ran: the logits were materialized"
    torch.testing.assert_close(l_upg, l_trl, rtol=1e-5, atol=1e-6)
    assert g_upg.keys() == g_trl.keys()
    for k in g_trl:
        torch.testing.assert_close(g_upg[k], g_trl[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert m_upg.keys() == m_trl.keys()
    for k in m_trl.keys() - {"num_tokens"}:   # num_tokens counts every call (cumulative)
        assert m_upg[k] == pytest.approx(m_trl[k], rel=1e-4, abs=1e-5), k
    assert "mean_token_accuracy" in m_upg and any(k.startswith("logits/") for k in m_upg)
    upg_trl.unpatch_dpo_trainer(trainer)
    n = len(calls)
    _loss_grads_metrics(trainer, batch)
    assert len(calls) == n and not upg_trl.is_patched(trainer)


def test_dpo_patch_real_training_step(tmp_path):
    """``trainer.train()`` for two steps, patched and not, from the same initial weights."""
    weights = []
    for patched in (False, True):
        trainer = _dpo_trainer(tmp_path / str(patched), max_steps=2)
        if patched:
            upg_trl.patch_dpo_trainer(trainer)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        out = trainer.train()
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        assert any((after[n] - before[n]).abs().max() > 0 for n in after)
        weights.append((out.training_loss, after))
    (loss0, w0), (loss1, w1) = weights
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_dpo_patch_rejects_non_trainer():
    with pytest.raises(TypeError, match="DPOTrainer"):
        upg_trl.patch_dpo_trainer(object())
