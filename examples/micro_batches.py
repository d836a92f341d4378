"""Gradient accumulation (and data parallelism) with exact normalisation: ``batch_totals`` + ``totals=``.

A self-contained script (random hidden states and lm_head, CPU): one GRPO batch of 4 prompts x 4 rollouts,
one rollout truncated (its mask all zero), split into uneven micro-batches. The steps:

1. compute the advantages over whole groups, **before splitting** (``group_advantages``);
2. count the whole batch once: ``totals = batch_totals(masks, group=process_group_or_None)``;
3. every micro-batch's loss divides by those totals; under DDP multiply it by ``totals.world_size``
   (DDP averages the ranks' gradients);

and the accumulated gradient equals the whole batch's in one call. Run with ``python`` (one process) or
``torchrun --nproc_per_node 2`` (gloo, each rank takes half of the groups).

    python examples/micro_batches.py
"""
from __future__ import annotations

import os

import torch

import upg_kernels
from upg_kernels import LossBatch, batch_totals, group_advantages, unified_policy_loss

G, PROMPTS, T, H, V = 4, 4, 6, 16, 50


def make_batch():
    g = torch.Generator().manual_seed(0)
    B = G * PROMPTS
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3] = False                          # a truncated rollout, filtered out (all-zero mask)
    mask[5, 4:] = False                      # a short completion
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    old = upg_kernels.token_logprobs(hidden, weight, targets).detach()
    return hidden, weight, targets, mask, rewards, old


def main():
    distributed = "RANK" in os.environ
    group = None
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    rank, world = (group.rank(), group.size()) if distributed else (0, 1)

    hidden, weight, targets, mask, rewards, old = make_batch()
    # 1. advantages over whole groups, before any split
    adv = group_advantages(rewards, group_size=G, mode="mean_std")
    batch = LossBatch(loss_mask=mask, advantages=adv, old_logprobs=old)

    # the reference: the whole batch in one call, one process
    w_ref = weight.clone().requires_grad_(True)
    unified_policy_loss(hidden, w_ref, targets, config="grpo", batch=batch).loss.backward()

    # this rank's rows (whole groups), split into uneven micro-batches
    per_rank = G * PROMPTS // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    cuts = [mine.start, mine.start + 1, mine.start + per_rank // 2, mine.stop]
    micro = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    # 2. the whole batch's counts, once per optimizer step
    totals = batch_totals([mask[s] for s in micro], group=group)
    # 3. every micro-batch divides by them
    w = weight.clone().requires_grad_(True)
    for s in micro:
        out = unified_policy_loss(hidden[s], w, targets[s], config="grpo", batch=batch.select(s), totals=totals)
        (out.loss * totals.world_size).backward()
    if distributed:   # what DDP does to the gradients: the mean over ranks
        torch.distributed.all_reduce(w.grad)
        w.grad /= world
    diff = float((w.grad - w_ref.grad).abs().max() / w_ref.grad.abs().max())
    if rank == 0:
        print(f"totals: {totals}")
        print(f"{len(micro)} micro-batches x {world} rank(s) vs one call: max relative dW difference {diff:.1e}")
    assert diff < 1e-10
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
