"""Rollouts with transformers ``generate`` (the default engine; runs anywhere, including CPU).

The engine samples from the training model itself, so ``sync_weights`` is a no-op and the
sampler log-probs equal the trainer's up to numerics (they are still returned so the importance
correction path is exercised the same way as with vLLM).

Sampler log-probs never materialise vocabulary-sized logits for the whole generation: ``generate`` is
NOT asked for ``output_logits`` / ``output_scores`` (that keeps every step's [B, V] logits on the device,
and stacking them is [B, T_new, V] fp32). Instead a ``LogitsProcessor`` (``_SampledLogprobs``) runs inside
the processor list, on the device: at each step it keeps ``log_softmax(scores / T)`` of that step only
([B, V] fp32) and, at the next step, gathers from it the log-prob of the token sampled at the previous
step (the last column of ``input_ids``) into a [B] tensor; the last step is gathered after ``generate``
returns. Custom processors run before transformers' sampling warpers (temperature, top-k, top-p), so the
kept scores are the logits ``generate`` samples from, before temperature and truncation: the log-probs are
``log_softmax(logits / T)`` (top-p does not renormalise them), the same distribution the trainer's
``token_logprobs(..., temperature=T)`` computes. (Non-sampling processors that ``generate`` builds from
the model's own ``generation_config``, e.g. a ``repetition_penalty``, run before it: then the log-probs
include them, as the sampling does, where the former ``output_logits`` path reported raw logits.)
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Rollout


class _SampledLogprobs:
    """LogitsProcessor: the log-prob of each sampled token under ``log_softmax(scores / T)``, one step at a time.

    Holds one step's [B, V] fp32 log-softmax on the device (never the whole generation) and a list of
    per-step [B] results. It returns ``scores`` unchanged. ``finish(sequences)`` gathers the last step.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.prev: Optional[torch.Tensor] = None  # [B, V] log-softmax of the previous step
        self.steps: list[torch.Tensor] = []       # [B] fp32 per generated token

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.prev.gather(-1, tokens.view(-1, 1).to(self.prev.device)).squeeze(-1))
        self.prev = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:          # input_ids[:, -1] is the token sampled from self.prev
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, T_new] log-probs (on the device) of the generated tokens ``new_tokens`` ([B, T_new])."""
        if self.prev is not None:
            self._take(new_tokens[:, -1])
        if len(self.steps) != new_tokens.shape[1]:
            raise RuntimeError(f"sampler log-probs: {len(self.steps)} generation steps for "
                               f"{new_tokens.shape[1]} new tokens")
        if not self.steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1)


class HFEngine:
    """Sample with ``model.generate`` in left-padded batches of at most ``batch_size`` sequences.

    ``return_logprobs`` (default True): report the sampler's log-prob of each completion token
    (``Rollout.logprobs``); False skips that work and returns ``logprobs=None`` (the trainer only needs
    them for the rollout importance correction, ``loss.rollout_is``).
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, return_logprobs: bool = True, **_unused):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.return_logprobs = bool(return_logprobs)
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
            eos_token_id=sorted(self.eos_ids),
            # never keep every step's [B, V] logits: the log-probs come from _SampledLogprobs
            return_dict_in_generate=False, output_logits=False, output_scores=False)
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
        kw = {}
        proc = None
        if self.return_logprobs:
            from transformers import LogitsProcessorList
            proc = _SampledLogprobs(temperature)
            kw["logits_processor"] = LogitsProcessorList([proc])
        res = dist.generate(self.model, input_ids=ids.to(device), attention_mask=mask.to(device),
                            generation_config=gen_cfg, **kw)
        seqs = getattr(res, "sequences", res)
        new_dev = seqs[:, L:]
        logp = proc.finish(new_dev).cpu() if proc is not None else None  # [B, T_new] fp32
        new = new_dev.cpu()
        del res, seqs, new_dev, proc
        rollouts = []
        for r, (pi, p) in enumerate(chunk):
            toks = new[r].tolist()
            comp, finish = [], "length"
            for t in toks:
                comp.append(t)
                if t in self.eos_ids:
                    finish = "stop"
                    break
            # padding after EOS is cut off with its log-probs
            lp = logp[r, :len(comp)].tolist() if logp is not None else None
            rollouts.append(Rollout(prompt_ids=list(p), completion_ids=comp, logprobs=lp,
                                    finish_reason=finish, prompt_index=pi))
        return rollouts
