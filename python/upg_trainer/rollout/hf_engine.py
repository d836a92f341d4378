"""Rollouts with transformers ``generate`` (the default engine; runs anywhere, including CPU).

The engine samples from the training model itself, so ``sync_weights`` is a no-op and the
sampler log-probs equal the trainer's up to numerics (they are still returned so the importance
correction path is exercised the same way as with vLLM).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Rollout


class HFEngine:
    """Sample with ``model.generate`` in left-padded batches of at most ``batch_size`` sequences."""

    def __init__(self, model, tokenizer, batch_size: int = 64, **_unused):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        from .. import distributed as dist  # model may be wrapped (DDP / FSDP2): read the plain LM's config
        eos = getattr(dist.unwrap_model(model).generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if not self.eos_ids:
            raise ValueError("the tokenizer has no eos_token_id: rollouts could never stop")

    def sync_weights(self, model) -> None:
        self.model = model  # same object: generation reads the live weights

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> list[Rollout]:
        from transformers import GenerationConfig

        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        greedy = temperature == 0
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else float(temperature),
            top_p=None if greedy else float(top_p), top_k=None if greedy else 0,
            max_new_tokens=int(max_new_tokens), pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids), return_dict_in_generate=True, output_logits=True)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[Rollout] = []
        # fork the RNG so sampling with a seed never disturbs the trainer's global RNG stream
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(int(seed))
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start:start + self.batch_size]
                out.extend(self._generate_batch(chunk, gen_cfg, float(temperature) or 1.0, device))
        if was_training:
            self.model.train()
        return out

    def _generate_batch(self, chunk, gen_cfg, temperature, device) -> list[Rollout]:
        L = max(len(p) for _, p in chunk)
        ids = torch.full((len(chunk), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, (_, p) in enumerate(chunk):  # left padding
            if len(p):
                ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, L - len(p):] = 1
        from .. import distributed as dist  # works unwrapped, under DDP and under FSDP2 (synced_gpus)
        res = dist.generate(self.model, input_ids=ids.to(device), attention_mask=mask.to(device),
                                  generation_config=gen_cfg)
        new = res.sequences[:, L:].cpu()
        logits = torch.stack(res.logits, dim=1).float().cpu()  # [B, T_new, V] raw logits
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        rollouts = []
        for r, (pi, p) in enumerate(chunk):
            toks = new[r].tolist()
            comp, finish = [], "length"
            for t in toks:
                comp.append(t)
                if t in self.eos_ids:
                    finish = "stop"
                    break
            lp = logp_all[r, torch.arange(len(comp)), torch.tensor(comp, dtype=torch.long)].tolist()
            rollouts.append(Rollout(prompt_ids=list(p), completion_ids=comp, logprobs=lp,
                                    finish_reason=finish, prompt_index=pi))
        return rollouts
