"""Rollouts with vLLM, colocated with the trainer (same process, same GPU).

Written against vLLM's documented offline API (``vllm.LLM``, ``SamplingParams``, ``TokensPrompt``,
``LLM.sleep`` / ``LLM.wake_up``, ``LLM.reset_prefix_cache``) and the in-process model's
``load_weights`` (the route TRL's colocate mode also uses). What has been run: the unit tests in
``tests/test_vllm_engine.py``, against a fake ``vllm`` module. A real vLLM on a GPU has NOT been run
by this project yet (see docs/examples.md, "What has and has not been run").

Life cycle, per training step (the trainer drives it through the ``RolloutEngine`` protocol)::

    engine.wake()                 # weights + KV cache back on the GPU (no-op when awake)
    rollouts = engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed)
    engine.sleep()                # level 1: weights to CPU RAM, KV cache dropped
    ... forward / backward / optimizer.step() on the trainer ...
    engine.sync_weights(model)    # marks the weights stale; the next wake() pushes them first
                                  # (weights woken alone, pushed, then the KV cache)

Design points:

- The engine is created with ``load_format="dummy"`` (no checkpoint read by vLLM) and the trainer's
  weights are pushed once at construction, so vLLM always samples from exactly the trainer's weights
  (also after ``--resume``, and for the embedded model, which has no weights on disk). vLLM only needs
  a directory with ``config.json``: the model's own path when it is a local directory, else the config
  is written to a temporary directory. The tokenizer is not loaded (``skip_tokenizer_init=True``):
  prompts go in as token ids, completions come back as token ids, and EOS ids are passed as
  ``stop_token_ids``.
- Sampler log-probs: ``SamplingParams(logprobs=0)`` returns the log-prob of each sampled token. vLLM's
  V1 engine reports *raw* log-probs (before temperature) unless the engine is built with
  ``logprobs_mode="processed_logprobs"``, which this engine requests (recent vLLM releases accept it; which release added it was not checked
  here, the engine falls back when it is refused). Then
  the log-probs are those of ``softmax(logits / T)`` restricted to the top-p nucleus when ``top_p < 1``
  (vLLM renormalises over the nucleus; with ``top_p = 1``, the HPT setting, they are exactly
  ``log_softmax(logits / T)``, what the trainer computes). Each rollout records which in
  ``extra["logprobs_mode"]``. With a vLLM that refuses it log-probs are kept only when
  ``temperature == 1``, otherwise ``logprobs`` is None and the trainer falls back to its own.
- Weight push: ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)``
  with transformers parameter names (vLLM maps them to its fused layers, e.g. q/k/v -> qkv_proj), one
  tensor at a time; under FSDP2 each parameter is all-gathered just before it is sent
  (``distributed.iter_full_params``, collective: every rank calls ``sync_weights``). This needs the
  engine in this process: the engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless already set), and
  under torchrun uses ``distributed_executor_backend="external_launcher"`` (one engine per rank, tensor
  parallel size 1, as TRL's colocate mode does). The prefix cache is reset after every push (cached KV of the old weights).
- Greedy (``temperature == 0``, the evaluation setting): one request per prompt, repeated ``n`` times;
  log-probs untempered.
- Seeds: with ``seed`` given, each of the ``len(prompts) * n`` samples is its own request with its own
  seed (reproducible, somewhat slower in vLLM); with ``seed=None`` one request per prompt with ``n``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import warnings
from typing import Any, Optional

from .base import Rollout

INSTALL_HINT = ("the vLLM rollout engine needs vLLM and a CUDA GPU: `pip install upg-kernels[vllm]` "
                "(vllm>=0.8), or use `--rollout.engine hf`")


class VLLMUnavailableError(RuntimeError, ImportError):
    """vLLM is not installed, or there is no CUDA device for it (a RuntimeError for the CLI's error
    handling, an ImportError for code that treats a missing optional dependency as one)."""


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise VLLMUnavailableError(f"{INSTALL_HINT} (import vllm: {e})") from e
    import torch
    if not torch.cuda.is_available():
        raise VLLMUnavailableError(f"{INSTALL_HINT} (vllm is installed but torch sees no CUDA device)")
    return vllm


def _sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    h = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


class VLLMEngine:
    """A colocated vLLM sampler implementing the ``RolloutEngine`` protocol.

    Args:
        model: the trainer's model (a transformers causal LM, or what ``distributed.wrap_model``
            returned); its config gives vLLM the architecture and its weights are pushed at start.
        tokenizer: its tokenizer (EOS / pad ids only; vLLM does not load a tokenizer).
        model_path: directory with the model's ``config.json`` (default: the model's
            ``name_or_path`` when it is a local directory, else a temporary copy of the config).
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV cache).
        max_model_len: longest prompt + completion (default: the model config's).
        dtype: vLLM dtype (default: the trainer model's parameter dtype).
        sleep_level: 1 (weights kept in CPU RAM while asleep) or 2 (weights discarded and pushed again
            from the trainer's model at the next ``wake``).
        enable_sleep_mode: False runs without sleep/wake (``sleep``/``wake`` become no-ops).
        seed: vLLM's engine seed (offset by the rank under torchrun).
        enforce_eager: disable CUDA graphs (slower sampling, faster start, less memory).
        tensor_parallel_size: only 1 is supported (one engine per trainer rank).
        llm_kwargs: extra keyword arguments for ``vllm.LLM``.
    """

    def __init__(self, model, tokenizer, *, model_path: Optional[str] = None,
                 gpu_memory_utilization: float = 0.3, max_model_len: Optional[int] = None,
                 dtype: Optional[str] = None, sleep_level: int = 1, enable_sleep_mode: bool = True,
                 seed: int = 0, enforce_eager: bool = False, tensor_parallel_size: int = 1,
                 llm_kwargs: Optional[dict] = None, **_unused):
        vllm = _import_vllm()
        from .. import distributed as D

        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if tensor_parallel_size != 1:
            raise NotImplementedError("VLLMEngine supports tensor_parallel_size=1 (one colocated engine per rank)")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.sleep_level = int(sleep_level)
        self.sleep_enabled = bool(enable_sleep_mode)
        lm = D.unwrap_model(model)
        self.eos_ids = self._eos_ids(lm, tokenizer)

        path = model_path or self._config_dir(lm)
        kwargs: dict[str, Any] = dict(
            model=path, tokenizer=path, skip_tokenizer_init=True, load_format="dummy",
            gpu_memory_utilization=float(gpu_memory_utilization), enable_sleep_mode=self.sleep_enabled,
            dtype=dtype or self._dtype_name(lm), seed=int(seed) + D.rank(), enforce_eager=bool(enforce_eager),
            tensor_parallel_size=1, enable_prefix_caching=True,
        )
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        if D.world_size() > 1:
            # one in-process engine per torchrun rank, sharing torchrun's process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        # keep the engine core in this process so its model is reachable for load_weights
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs.update(llm_kwargs or {})
        import torch
        if torch.cuda.is_available():
            # vLLM sizes itself from the free GPU memory: hand back what the caching allocator holds
            # (e.g. the full model copy freed by FSDP2 sharding)
            torch.cuda.empty_cache()
        try:
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kwargs)
            self.logprobs_mode = "processed_logprobs"
        except (TypeError, ValueError) as e:
            # a vLLM without logprobs_mode, or without its "processed_logprobs" value: raw log-probs only
            if "logprobs_mode" not in str(e):
                raise
            self.llm = vllm.LLM(**kwargs)
            self.logprobs_mode = "raw_logprobs"
        self._awake = {"weights": True, "kv_cache": True}
        self._weights_valid = False
        self._warned = False
        self._model = None
        self._stale = False
        self.sync_weights(model)
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
        try:
            dt = next(lm.parameters()).dtype
        except StopIteration:
            return "auto"
        return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(dt, "auto")

    def _config_dir(self, lm) -> str:
        src = getattr(lm, "name_or_path", "") or getattr(getattr(lm, "config", None), "_name_or_path", "")
        if src and os.path.isfile(os.path.join(src, "config.json")):
            return src
        self._tmp = tempfile.TemporaryDirectory(prefix="upg_vllm_")
        lm.config.save_pretrained(self._tmp.name)
        gen = getattr(lm, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(self._tmp.name)
            except Exception:  # a generation config is optional for vLLM
                pass
        return self._tmp.name

    def _inner_model(self):
        """The ``nn.Module`` vLLM runs (in this process), for ``load_weights``."""
        eng = self.llm.llm_engine
        for chain in (("model_executor", "driver_worker", "model_runner", "model"),
                      ("model_executor", "driver_worker", "worker", "model_runner", "model")):
            obj = eng
            try:
                for name in chain:
                    obj = getattr(obj, name)
            except AttributeError:
                continue
            if hasattr(obj, "load_weights"):
                return obj
        raise RuntimeError("VLLMEngine: cannot reach vLLM's model in this process "
                           "(llm.llm_engine.model_executor.driver_worker.model_runner.model); the engine core "
                           "is probably in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 before "
                           "creating the engine, or run under torchrun (external_launcher)")

    # ------------------------------------------------------------------ protocol
    def sleep(self) -> None:
        if not self.sleep_enabled or not any(self._awake.values()):
            return
        self.llm.sleep(level=self.sleep_level)
        self._awake = {"weights": False, "kv_cache": False}
        if self.sleep_level == 2:
            self._weights_valid = False

    def _wake(self, tags: list[str]) -> None:
        todo = [t for t in tags if not self._awake[t]]
        if not todo:
            return
        if len(todo) == 2:
            self.llm.wake_up()
        else:
            try:
                self.llm.wake_up(tags=todo)
            except TypeError:  # vLLM without tags: wake everything
                self.llm.wake_up()
                todo = ["weights", "kv_cache"]
        for t in todo:
            self._awake[t] = True

    def wake(self) -> None:
        """Weights (re-pushed first when stale or dropped by sleep level 2) and KV cache back on the GPU.

        Collective under FSDP2 when a push is due: every rank calls it in step (the trainer does)."""
        if self._stale or not self._weights_valid:
            self._push()
        if self.sleep_enabled:
            self._wake(["weights", "kv_cache"])

    def sync_weights(self, model) -> None:
        """Record that vLLM must sample from ``model``'s current weights.

        The push itself happens at the next ``wake()`` / ``generate()``: the trainer calls this after
        every optimizer update (two per step with two mini-batches), and only the last one before a
        rollout matters; deferring it also keeps vLLM's weights off the GPU during the updates."""
        self._model = model
        self._stale = True

    def _push(self) -> None:
        from .. import distributed as D
        if self._model is None:
            raise RuntimeError("VLLMEngine: no model to take weights from; call sync_weights(model)")
        if self.sleep_enabled:
            self._wake(["weights"])  # only the weights: the KV cache stays released until wake()
        target = self._inner_model()
        target.load_weights(D.iter_full_params(self._model))  # one full parameter at a time
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._weights_valid = True
        self._stale = False

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> list[Rollout]:
        """``n`` completions per prompt, grouped by prompt. ``temperature == 0`` is greedy decoding:
        one request per prompt, its completion repeated ``n`` times, log-probs untempered (T = 1)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        self.wake()
        greedy = float(temperature) == 0.0
        # vLLM's greedy path and raw_logprobs are both untempered; processed_logprobs are tempered
        keep_lp = greedy or self.logprobs_mode == "processed_logprobs" or float(temperature) == 1.0
        if not keep_lp and not self._warned:
            warnings.warn("this vLLM reports log-probs before temperature (no logprobs_mode); with "
                          f"temperature={temperature} the rollouts carry no sampler log-probs", stacklevel=2)
            self._warned = True
        SamplingParams = self._vllm.SamplingParams
        common = dict(max_tokens=int(max_new_tokens), logprobs=0, stop_token_ids=list(self.eos_ids),
                      detokenize=False)
        if greedy:
            common.update(temperature=0.0)
        else:
            common.update(temperature=float(temperature), top_p=float(top_p))
        # requests: (prompt index, first sample index, samples in the request, TokensPrompt, SamplingParams)
        reqs: list[tuple[int, int, int, dict, Any]] = []
        for i, p in enumerate(prompts):
            tp = {"prompt_token_ids": [int(t) for t in p]}
            if greedy:
                reqs.append((i, 0, 1, tp, SamplingParams(n=1, **common)))
            elif seed is None:
                reqs.append((i, 0, int(n), tp, SamplingParams(n=int(n), **common)))
            else:
                for j in range(n):
                    reqs.append((i, j, 1, tp, SamplingParams(n=1, seed=_sample_seed(int(seed), i, j), **common)))
        outputs = self.llm.generate([r[3] for r in reqs], [r[4] for r in reqs], use_tqdm=False)
        if len(outputs) != len(reqs):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(reqs)} requests")
        if greedy or self.logprobs_mode == "raw_logprobs":
            mode = "untempered" if greedy or float(temperature) == 1.0 else None
        else:
            mode = "processed_logprobs" if top_p >= 1.0 else "processed_logprobs_top_p_renormalised"
        grouped: list[list[Optional[Rollout]]] = [[None] * n for _ in prompts]
        for (i, j0, count, _tp, _sp), out in zip(reqs, outputs):
            comps = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
            if len(comps) != count:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {i}, expected {count}")
            for k, comp in enumerate(comps):
                grouped[i][j0 + k] = self._to_rollout(prompts[i], i, comp, keep_lp, mode)
            if greedy:  # the same completion n times (independent copies)
                first = grouped[i][0]
                for k in range(1, n):
                    grouped[i][k] = dataclasses.replace(
                        first, completion_ids=list(first.completion_ids),
                        logprobs=None if first.logprobs is None else list(first.logprobs),
                        extra=dict(first.extra))
        return [r for g in grouped for r in g]  # type: ignore[misc]

    def _to_rollout(self, prompt, prompt_index, comp, keep_lp, mode) -> Rollout:
        ids = [int(t) for t in comp.token_ids]
        lps = None
        if keep_lp:
            if comp.logprobs is None or len(comp.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned {0 if comp.logprobs is None else len(comp.logprobs)} "
                                   f"log-prob entries for {len(ids)} tokens")
            lps = []
            for pos, tok in zip(comp.logprobs, ids):
                entry = pos[tok]  # logprobs=0: the sampled token's entry is always present
                lps.append(float(getattr(entry, "logprob", entry)))
        reason = comp.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with reason {reason!r} (expected stop or length)")
        return Rollout(prompt_ids=list(prompt), completion_ids=ids, logprobs=lps, finish_reason=reason,
                       prompt_index=prompt_index, extra={"logprobs_mode": mode if keep_lp else None})
