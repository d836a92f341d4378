"""TRL's GRPOTrainer with its log-prob/entropy kernel swapped for upg-kernels: one extra line.

The trainer is built exactly as TRL 1.16's documentation shows (``GRPOTrainer`` docstring quickstart);
``patch_grpo_trainer(trainer)`` then routes the fused LM head of the policy and reference models through
``upg_kernels.token_logprobs``. TRL's loss math, options and logging are unchanged.

    # the TRL quickstart (downloads Qwen2.5-0.5B-Instruct and trl-lib/DeepMath-103K; needs a GPU to be quick)
    python examples/trl_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 10

    # offline smoke run: a tiny randomly initialised Llama, a word-level tokenizer and a toy reward, on CPU
    python examples/trl_grpo.py --tiny [--upg-loss [--normalization global]] [--grad-accum 2]

``--upg-loss`` also replaces TRL's loss math by ``upg_kernels.unified_policy_loss`` (``patch_grpo_trainer(...,
loss=True)``: one fused pass whose backward skips zero-coefficient rows; same loss, gradients and metrics).
``--normalization global`` (with ``--upg-loss``) makes the normalisation exact: every loss type divides by the
totals (``upg_kernels.batch_totals``) of the optimizer step's micro-batches on every process, counted once
when TRL buffers the generation batch, so the gradient does not depend on ``--grad-accum`` or on the number of
processes (TRL's own normalisation, the default ``trl``, divides each micro-batch of bnpo by its own tokens).

What was run when this file was written: ``--tiny``, ``--tiny --upg-loss`` and ``--tiny --upg-loss --normalization
global --grad-accum 2`` on CPU (TRL 1.16.0, transformers 5.24.0, torch 2.13 CPU).
The hub variant was not run (no network on the development machine); it uses only TRL's documented API.
"""
from __future__ import annotations

import argparse

from upg_kernels.integrations.trl import NORMALIZATIONS, patch_grpo_trainer


def tiny_setup():
    """A tiny random model + tokenizer + prompt dataset + reward, built locally (no downloads)."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=1))
    dataset = Dataset.from_dict({"prompt": [" ".join(f"w{(7 * i + j) % 120}" for j in range(3 + i % 4))
                                            for i in range(64)]})

    def reward_even_tokens(completions, **kwargs):
        """Toy reward: the share of completion words with an even id."""
        out = []
        for c in completions:
            words = [w for w in c.split() if w.startswith("w") and w[1:].isdigit()]
            out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
        return out

    return model, tokenizer, dataset, reward_even_tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="offline CPU smoke run with a tiny random model")
    ap.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--loss-type", default="dapo", help="TRL's loss_type: grpo, bnpo, dr_grpo, dapo, cispo, sapo, ...")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--backend", default="auto", help="upg-kernels backend: auto, triton, torch")
    ap.add_argument("--upg-loss", action="store_true",
                    help="also compute the policy loss with upg_kernels.unified_policy_loss (patch loss=True)")
    ap.add_argument("--normalization", default="trl", choices=list(NORMALIZATIONS),
                    help="with --upg-loss: 'trl' keeps TRL's normalisers, 'global' makes them exact over "
                         "gradient accumulation and processes")
    ap.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (--tiny: the 8 rows "
                    "of a step are split into this many micro-batches)")
    ap.add_argument("--output-dir", default=None, help="the trainer's output_dir")
    args = ap.parse_args(argv)
    if args.normalization != "trl" and not args.upg_loss:
        ap.error("--normalization needs --upg-loss (the kernel swap alone keeps TRL's loss)")

    from trl import GRPOConfig, GRPOTrainer

    if args.tiny:
        model, tokenizer, dataset, reward = tiny_setup()
        if 8 % args.grad_accum:
            ap.error("--grad-accum must divide 8 (the rows of one optimizer step)")
        config = GRPOConfig(output_dir=args.output_dir or "/tmp/upg-trl-grpo-tiny",
                            per_device_train_batch_size=8 // args.grad_accum,
                            gradient_accumulation_steps=args.grad_accum, num_generations=4,
                            max_completion_length=8, loss_type=args.loss_type, max_steps=args.max_steps,
                            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    else:
        from datasets import load_dataset
        from trl.rewards import accuracy_reward

        dataset = load_dataset("trl-lib/DeepMath-103K", split="train")
        config = GRPOConfig(output_dir=args.output_dir or "upg-trl-grpo", loss_type=args.loss_type,
                            max_steps=args.max_steps, gradient_accumulation_steps=args.grad_accum,
                            logging_steps=1, report_to=[])
        trainer = GRPOTrainer(model=args.model, reward_funcs=accuracy_reward, args=config, train_dataset=dataset)

    patch_grpo_trainer(trainer, backend=args.backend, loss=args.upg_loss,  # <- the one line
                       normalization=args.normalization)
    trainer.train()
    rows = [{k: row[k] for k in ("step", "loss", "reward", "entropy") if k in row}
            for row in trainer.state.log_history if "loss" in row]
    for row in rows:
        print(row)
    return rows


if __name__ == "__main__":
    main()
