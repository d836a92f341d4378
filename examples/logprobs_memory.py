"""Per-token log-probs of a small transformers model through the fused path, and the memory it saves.

Builds a tiny randomly initialised Qwen2-style model from a config (no downloads), runs its decoder
to get the last hidden states, and computes the log-probs of the next tokens two ways:

* materialized: ``lm_head(hidden) -> float32 -> log_softmax -> gather`` (what most trainers do);
* fused: ``upg_kernels.token_logprobs(hidden, lm_head.weight, targets)``.

It checks that both agree and reports the largest allocation each path makes, forward and backward,
as recorded by the PyTorch profiler (``profile_memory=True``; CPU).

    python examples/logprobs_memory.py [--vocab 32000 --tokens 2048]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import upg_kernels


def largest_allocation(fn) -> tuple[torch.Tensor, int]:
    """Runs ``fn`` (forward and backward) and returns its output and its largest allocation in bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        out.sum().backward()
    return out.detach(), max((e.cpu_memory_usage for e in prof.events()), default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=2048, help="batch x sequence length")
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    seq = 256
    B = max(1, args.tokens // seq)
    ids = torch.randint(0, args.vocab, (B, seq + 1))
    hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state.detach()
    targets = ids[:, 1:]
    W = model.lm_head.weight

    def materialized(h):
        logits = (h @ W.T).float()
        return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def fused(h):
        return upg_kernels.token_logprobs(h, W, targets)

    results = {}
    for name, fn in [("materialized", materialized), ("fused", fused)]:
        h = hidden.clone().requires_grad_(True)
        results[name] = largest_allocation(lambda: fn(h))

    diff = (results["fused"][0] - results["materialized"][0]).abs().max().item()
    N, V = targets.numel(), args.vocab
    print(f"tiny Qwen2 decoder, {N} tokens, vocabulary {V}, hidden {args.hidden} (CPU, float32)")
    print(f"max |log-prob difference| fused vs materialized: {diff:.2e}")
    for name, (_, big) in results.items():
        print(f"  largest allocation of the {name:12s} path (fwd+bwd): {big / 2**20:9.1f} MiB")
    saved = results["materialized"][1] - results["fused"][1]
    print(f"  N x V float32 logits are {N * V * 4 / 2**20:.1f} MiB; the fused path's largest allocation "
          f"is {saved / 2**20:.1f} MiB smaller (the torch backend works in chunks of "
          f"{upg_kernels.kernels.torch_chunked.chunk_rows(V)} tokens; on CUDA the Triton kernels hold "
          f"no logits in memory at all)")


if __name__ == "__main__":
    main()
