"""Make TRL's ``GRPOTrainer`` run its vocab-sized work on upg-kernels.

How TRL 1.16 computes the GRPO loss (read from ``trl/trainer/grpo_trainer.py`` and ``trl/trainer/utils.py``):
it no longer calls Liger's ``LigerFusedLinearGRPOLoss``. Its constructor always patches the policy (and the
reference model) with ``add_fused_lm_head``; ``_get_per_token_logps_and_entropies`` then calls
``model(..., labels=labels, fused_lm_head=True)``, whose forward runs the backbone and hands the last hidden
states, the lm_head weight/bias and the labels to ``trl.kernels.ChunkedLogProbFunction`` (looked up as
``trl.trainer.utils._ChunkedLogProbFunction`` at call time). That function returns per-token log-probs and
entropies without materializing the logits; the loss math (clipping, KL, aggregation, the entropy bonus and
masks, every ``loss_type``) is then done on ``[B, T]`` tensors in ``GRPOTrainer._compute_loss``.

So the fused path of TRL 1.16 is that kernel, and :func:`patch_grpo_trainer` swaps it, for one trainer, for
:func:`upg_kernels.token_logprobs`. TRL's loss math, metrics and logging stay exactly TRL's, so every TRL
option keeps working; only the log-prob/entropy kernel (forward and backward) is ours.

For older TRL releases (0.19 to 0.2x) that built a ``LigerFusedLinearGRPOLoss`` when ``use_liger_loss=True``
and stored it as ``trainer.liger_grpo_loss``, the same call also replaces that module by
:class:`upg_kernels.FusedLinearGRPOLoss` with the same settings.

With ``loss=True`` the trainer's ``_compute_loss`` is also replaced: the policy loss of the supported
loss types (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo; token or sequence level; beta, with or
without ``use_bias_correction_kl``; delta; vLLM IS correction) is then computed by
:func:`upg_kernels.unified_policy_loss` from the backbone's last hidden states and the lm_head (one fused pass;
the backward skips rows whose gradient coefficient is 0), with TRL's logged metrics. The loss divides by a
:class:`upg_kernels.BatchTotals`: TRL's own normalisers expressed as totals (``normalization="trl"``, the
default: the loss equals TRL's), or the exact totals of the optimizer step over every micro-batch and process
(``normalization="global"``: the gradient is independent of gradient accumulation and of the process count).
Options this mode does not cover raise ``NotImplementedError`` when patching (see :func:`patch_grpo_trainer`).

Usage::

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    patch_grpo_trainer(trainer)            # or patch_grpo_trainer(trainer, loss=True[, normalization="global"])
    trainer.train()
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from ..logprobs import token_logprobs
from ..losses.batch import batch_totals

__all__ = ["patch_grpo_trainer", "unpatch_grpo_trainer", "patch_dpo_trainer", "unpatch_dpo_trainer",
           "UPGChunkedLogProbFunction", "is_patched", "NORMALIZATIONS"]

# patch_grpo_trainer(loss=True, normalization=...): what each loss divides by
NORMALIZATIONS = {
    "trl": "TRL's own normalisers (the drop-in reproduces TRL's loss): every loss type divided by the "
           "accumulation steps, per micro-batch rows (grpo, sapo, dr_grpo, luspo) or tokens (bnpo); dapo, "
           "cispo, vespo by num_items_in_batch / num_processes * accumulation / steps_per_generation",
    "global": "exact: every loss type divides by the totals (upg_kernels.batch_totals) of the optimizer "
              "step's micro-batches on every process, so the gradient does not depend on "
              "gradient_accumulation_steps or the process count",
}

_SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy", "mean_logits", "is_top1"})
_METRIC_CHUNK = 1 << 22   # logits elements per chunk of the (no-grad) metric outputs
_DEFAULT_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's OPTIONAL_OUTPUTS
_lock = threading.RLock()


class UPGChunkedLogProbFunction:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction`` with the same ``apply`` signature and outputs.

    ``apply(hidden [N,H], weight [V,H], bias, targets [N], temperature, chunk_size, final_logit_softcapping,
    logit_scale, outputs)`` returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``; TRL's
    logits transform is ``softcap(logit_scale * (h @ W.T + b)) / temperature``. ``log_probs`` and ``entropy``
    come from :func:`upg_kernels.token_logprobs` (``logit_scale`` is folded into ``h`` and ``b``, which is
    exact); the detached metric outputs ``mean_logits`` and ``is_top1`` (DPOTrainer's ``logits/*`` and
    ``mean_token_accuracy``) from :func:`_logit_metrics`. When a caller asks for ``log_sum_sq_probs`` (DPO's WPO
    weighting), the call goes to ``fallback`` (TRL's own function).
    """

    fallback = None  # set to TRL's ChunkedLogProbFunction when patching
    backend = "auto"

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=_DEFAULT_OUTPUTS):
        outputs = tuple(outputs)
        if not set(outputs) <= _SUPPORTED_OUTPUTS:
            if cls.fallback is None:
                raise NotImplementedError(
                    f"upg-kernels computes only log_probs and entropy, asked for {outputs}")
            return cls.fallback.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
        if logit_scale is None:
            logit_scale = 1.0
        if logit_scale != 1.0:
            hidden = hidden * logit_scale
            bias = None if bias is None else bias * logit_scale
        softcap = final_logit_softcapping if final_logit_softcapping else None
        want_entropy = "entropy" in outputs
        res = token_logprobs(hidden, weight, targets, bias=bias, temperature=float(temperature),
                             softcap=softcap, return_entropy=want_entropy, backend=cls.backend)
        logp, ent = res if want_entropy else (res, None)
        mean_logits = is_top1 = None
        if "mean_logits" in outputs or "is_top1" in outputs:
            mean_logits, is_top1 = _logit_metrics(hidden, weight, bias, targets, float(temperature), softcap)
            mean_logits = mean_logits if "mean_logits" in outputs else None
            is_top1 = is_top1 if "is_top1" in outputs else None
        return logp, ent, None, mean_logits, is_top1


@torch.no_grad()
def _logit_metrics(hidden, weight, bias, targets, temperature, softcap):
    """TRL's metric outputs, detached: ``mean_logits`` (the vocabulary mean of the transformed logits) and
    ``is_top1`` (the target is the first arg-max, TRL's tie rule), over row chunks of at most 4M logits, without
    gradient; the kernel's log-probs do not give a row's arg-max, so this is a second (forward-only) pass."""
    h = hidden.detach().float()
    w = weight.detach().float()
    b = None if bias is None else bias.detach().float()
    n = h.shape[0]
    top1 = torch.empty(n, dtype=torch.bool, device=h.device)
    mean = torch.empty(n, dtype=torch.float32, device=h.device)
    step = max(1, _METRIC_CHUNK // max(w.shape[0], 1))
    for i in range(0, n, step):
        z = h[i:i + step] @ w.T
        if b is not None:
            z = z + b
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        top1[i:i + step] = z.argmax(-1) == targets[i:i + step]
        mean[i:i + step] = z.mean(-1)
    return mean, top1


def _make_kernel_class(backend: str, fallback):
    return type("UPGChunkedLogProbFunction", (UPGChunkedLogProbFunction,),
                {"backend": backend, "fallback": fallback})


def is_patched(trainer) -> bool:
    return getattr(trainer, "_upg_kernels_patch", None) is not None


def patch_grpo_trainer(trainer, *, backend: str = "auto", replace_liger_loss: bool = True, loss: bool = False,
                       normalization: str = "trl"):
    """Make ``trainer`` (a ``trl.GRPOTrainer``) compute log-probs and entropies with upg-kernels.

    * TRL >= 1.x: every call of ``trainer._get_per_token_logps_and_entropies`` (policy forward in the loss,
      old- and reference-policy log-probs) runs with TRL's fused-LM-head kernel swapped for
      :class:`UPGChunkedLogProbFunction`; other trainers and models in the process are not affected.
    * Older TRL with ``use_liger_loss=True``: ``trainer.liger_grpo_loss`` is replaced by an
      :class:`upg_kernels.FusedLinearGRPOLoss` built with the same settings (``replace_liger_loss``).

    * ``loss=True`` (TRL >= 1.x): ``trainer._compute_loss`` runs :func:`upg_kernels.unified_policy_loss` (see the
      module docstring). Not covered, raising ``NotImplementedError`` here: loss types other than grpo, bnpo,
      dr_grpo, dapo, cispo, sapo, luspo, vespo; ``top_entropy_quantile < 1``;
      ``off_policy_mask_threshold``; the entropy bonus; MoE aux loss; PEFT models; models with final-logit
      softcapping or a logit scale. Multimodal inputs raise at the call.
    * ``normalization`` (with ``loss=True``; :data:`NORMALIZATIONS`): ``"trl"`` (default) keeps TRL's
      normalisers, expressed as :class:`upg_kernels.BatchTotals`: the loss equals TRL's. ``"global"`` counts
      the totals once per optimizer step, when TRL buffers a generation batch (``_prepare_inputs``): over the
      ``gradient_accumulation_steps`` micro-batches of the step and every process (one all-reduce of 4
      numbers per step), and multiplies the loss by the process count (DDP averages); the gradient of every
      loss type is then that of the step's whole batch in one call, independent of
      ``gradient_accumulation_steps`` and of the process count. Needs ``steps_per_generation`` to be a
      multiple of ``gradient_accumulation_steps``.

    Idempotent (the same options again change nothing; other options on a patched trainer raise: unpatch
    first); returns the trainer. :func:`unpatch_grpo_trainer` undoes it.
    """
    options = dict(backend=backend, replace_liger_loss=replace_liger_loss, loss=loss, normalization=normalization)
    if is_patched(trainer):
        before = trainer._upg_kernels_patch.get("options")
        if before != options:
            raise ValueError(f"the trainer is already patched (with {before or 'patch_dpo_trainer'}); call "
                             f"unpatch_grpo_trainer(trainer) first to patch it with {options}")
        return trainer
    try:
        import trl.trainer.utils as trl_utils
    except ImportError as exc:  # pragma: no cover - exercised only without TRL
        raise ImportError("patch_grpo_trainer needs TRL installed (pip install trl)") from exc
    if not hasattr(trainer, "_get_per_token_logps_and_entropies") and not hasattr(trainer, "liger_grpo_loss"):
        raise TypeError(f"{type(trainer).__name__} does not look like a trl.GRPOTrainer: it has neither "
                        "_get_per_token_logps_and_entropies nor liger_grpo_loss")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    if normalization != "trl" and not loss:
        raise ValueError(f"normalization={normalization!r} needs loss=True (the kernel swap alone keeps TRL's "
                         "loss and its normalisation)")
    if loss:   # everything refused is refused before the trainer is touched
        _check_loss_mode(trainer)
        if normalization == "global":
            _check_global_normalization(trainer)
    state = {}
    original_kernel = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if hasattr(trainer, "_get_per_token_logps_and_entropies") and original_kernel is not None:
        state["methods"] = _swap_kernel_in(trainer, ("_get_per_token_logps_and_entropies",), backend, trl_utils)
        state["method"] = True
    elif hasattr(trainer, "_get_per_token_logps_and_entropies"):
        # a TRL without the fused LM head: nothing to swap on the log-prob path
        state["method"] = False

    liger = getattr(trainer, "liger_grpo_loss", None)
    if replace_liger_loss and liger is not None:
        from .liger import FusedLinearGRPOLoss
        state["liger_grpo_loss"] = liger
        trainer.liger_grpo_loss = FusedLinearGRPOLoss.from_liger(liger, backend=backend)
    state["options"] = options
    if loss:
        if normalization == "global":
            _wrap_prepare_inputs(trainer, state)
        original_compute = trainer._compute_loss
        trainer._compute_loss = functools.partial(_upg_compute_loss, trainer, backend=backend)
        state["compute_loss"] = original_compute
    if not state.get("method") and "liger_grpo_loss" not in state:
        raise RuntimeError(
            "nothing to patch: this TRL has no fused LM head (trl.trainer.utils._ChunkedLogProbFunction) and the "
            "trainer has no liger_grpo_loss (set use_liger_loss=True on TRL versions that have it)")
    trainer._upg_kernels_patch = state
    return trainer


def unpatch_grpo_trainer(trainer):
    """Undo :func:`patch_grpo_trainer`; returns the trainer."""
    state = getattr(trainer, "_upg_kernels_patch", None)
    if state is None:
        return trainer
    for name in state.get("methods", ()):
        delattr(trainer, name)  # the class method shows through again
    if "liger_grpo_loss" in state:
        trainer.liger_grpo_loss = state["liger_grpo_loss"]
    if "compute_loss" in state:
        del trainer._compute_loss
    if "_prepare_inputs" in vars(trainer) and state.get("options", {}).get("normalization") == "global":
        del trainer._prepare_inputs
    trainer._upg_kernels_patch = None
    return trainer


def _swap_kernel_in(trainer, names, backend, trl_utils):
    """Wrap the trainer's methods ``names`` so that, during their calls, TRL's fused-LM-head kernel
    (``trl.trainer.utils._ChunkedLogProbFunction``, read at call time) is ours; returns the names."""
    kernel = _make_kernel_class(backend, trl_utils._ChunkedLogProbFunction)
    for name in names:
        original_method = getattr(trainer, name)  # bound method

        @functools.wraps(original_method)
        def _patched(*args, _original=original_method, **kwargs):
            with _lock:
                saved = trl_utils._ChunkedLogProbFunction
                trl_utils._ChunkedLogProbFunction = kernel
                try:
                    return _original(*args, **kwargs)
                finally:
                    trl_utils._ChunkedLogProbFunction = saved

        setattr(trainer, name, _patched)
    return tuple(names)


_DPO_METHODS = ("_compute_loss", "compute_ref_log_probs")


def patch_dpo_trainer(trainer, *, backend: str = "auto"):
    """Make ``trainer`` (a ``trl.DPOTrainer``, TRL 1.16) compute its per-token log-probs with upg-kernels.

    TRL 1.16's DPOTrainer, like its GRPOTrainer, patches the policy and the reference model with
    ``add_fused_lm_head`` and calls ``model(..., labels=labels, fused_lm_head=True)`` in ``_compute_loss``
    (policy and reference forward) and ``compute_ref_log_probs`` (precomputed reference log-probs). During
    those calls TRL's kernel is :class:`UPGChunkedLogProbFunction`: log-probs and entropy (forward and
    backward) from :func:`upg_kernels.token_logprobs`, the ``mean_logits``/``is_top1`` metrics from a
    forward-only pass. TRL's DPO loss math (every ``loss_type``, ``beta``, label smoothing, ``ld_alpha``, RPO,
    its metrics) is untouched. With ``use_weighting=True`` (WPO) TRL asks for ``log_sum_sq_probs``, which we
    do not compute: those calls stay on TRL's kernel. Idempotent; returns the trainer.
    """
    if is_patched(trainer):
        return trainer
    try:
        import trl.trainer.utils as trl_utils
    except ImportError as exc:  # pragma: no cover - exercised only without TRL
        raise ImportError("patch_dpo_trainer needs TRL installed (pip install trl)") from exc
    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is None:
        raise RuntimeError("this TRL has no fused LM head (trl.trainer.utils._ChunkedLogProbFunction)")
    missing = [n for n in _DPO_METHODS if not hasattr(trainer, n)]
    if missing:
        raise TypeError(f"{type(trainer).__name__} does not look like a TRL 1.16 DPOTrainer: no {missing}")
    trainer._upg_kernels_patch = {"methods": _swap_kernel_in(trainer, _DPO_METHODS, backend, trl_utils)}
    return trainer


def unpatch_dpo_trainer(trainer):
    """Undo :func:`patch_dpo_trainer`; returns the trainer."""
    return unpatch_grpo_trainer(trainer)


# ------------------------------------------------------------------------------------------- loss=True
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
            "num_tiles", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _check_loss_mode(trainer):
    from .liger import LIGER_LOSS_TYPES

    args = trainer.args
    problems = []
    if not hasattr(trainer, "_compute_loss"):
        problems.append("this TRL has no GRPOTrainer._compute_loss")
    if getattr(trainer, "loss_type", None) not in LIGER_LOSS_TYPES:
        problems.append(f"loss_type={getattr(trainer, 'loss_type', None)!r} (supported: {LIGER_LOSS_TYPES})")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        problems.append("top_entropy_quantile < 1")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        problems.append("off_policy_mask_threshold")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        problems.append("the entropy bonus (entropy_coef / adaptive entropy)")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("the MoE router aux loss")
    try:
        from accelerate.utils import is_peft_model
        if is_peft_model(trainer.model):
            problems.append("PEFT models")
    except ImportError:  # pragma: no cover
        pass
    tc = trainer.model.config.get_text_config() if hasattr(trainer.model.config, "get_text_config") \
        else trainer.model.config
    if getattr(tc, "final_logit_softcapping", None) is not None:
        problems.append("final_logit_softcapping")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(tc, name, None) not in (None, 1, 1.0):
            problems.append(f"config.{name}")
    if problems:
        raise NotImplementedError("patch_grpo_trainer(loss=True) does not cover: " + "; ".join(problems)
                                  + ". Use patch_grpo_trainer(trainer) (kernel swap only), which supports them.")


def _hidden_states(unwrapped, input_ids, attention_mask, C):
    """The backbone's last hidden states at the positions that predict the C completion tokens."""
    out = unwrapped.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -C - 1:-1]


def _loss_totals(trainer, inputs, mask, mode):
    """``(totals, factor)`` of one ``_compute_loss`` call: ``unified_policy_loss(..., totals=totals).loss * factor``.

    ``normalization="trl"``: TRL 1.16's normalisers of each loss type (:func:`~.liger.normalizer_totals`: every
    type divided by the accumulation steps; dapo/cispo/vespo by ``num_items_in_batch / num_processes *
    accumulation / steps_per_generation``). ``"global"``: the totals :func:`_count_windows` counted over the
    optimizer step's micro-batches on every process; the factor ``world_size`` compensates DDP's mean."""
    from .liger import DAPO_NORMALIZED, normalizer_totals

    state = trainer._upg_kernels_patch
    if state["options"]["normalization"] == "global":
        if mode == "train":
            for micro, totals in state.get("window_totals", ()):
                if micro is inputs:
                    return totals, totals.world_size
            raise RuntimeError(
                "patch_grpo_trainer(normalization='global'): this training micro-batch does not come from the "
                "trainer's buffered generation batch (GRPOTrainer._prepare_inputs), whose optimizer-step totals "
                "were counted; call compute_loss with the inputs _prepare_inputs returns")
        totals = batch_totals(mask, group=_process_group(trainer))   # eval: one call is the whole batch
        return totals, totals.world_size
    gas = int(trainer.current_gradient_accumulation_steps) if mode == "train" else 1
    dapo_count = None
    if trainer.loss_type in DAPO_NORMALIZED:
        dapo_count = float(inputs["num_items_in_batch"].clamp(min=1.0))
        if mode == "train":  # TRL rescales the generation batch's count to one accumulation window
            dapo_count = dapo_count * gas / trainer.args.steps_per_generation
    return normalizer_totals(trainer.loss_type, mask, dapo_count=dapo_count,
                             world=trainer.accelerator.num_processes, accumulation=gas)


def _process_group(trainer):
    """The data-parallel group of the trainer's processes (None for one process)."""
    if trainer.accelerator.num_processes == 1:
        return None
    return torch.distributed.group.WORLD


def _count_windows(trainer):
    """``[(micro-batch, totals)]`` for the trainer's buffered generation batch: each optimizer step's
    ``gradient_accumulation_steps`` consecutive micro-batches counted together over every process (one
    :func:`upg_kernels.batch_totals` call, one small all-reduce, per optimizer step)."""
    buffered = trainer._buffered_inputs
    gas = trainer.args.gradient_accumulation_steps
    group = _process_group(trainer)
    out = []
    for start in range(0, len(buffered), gas):
        window = buffered[start:start + gas]
        totals = batch_totals([_loss_mask(b) for b in window], group=group)
        out += [(b, totals) for b in window]
    return out


def _loss_mask(inputs):
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def _check_global_normalization(trainer):
    spg, gas = trainer.args.steps_per_generation, trainer.args.gradient_accumulation_steps
    if spg % gas:
        raise NotImplementedError(
            f"patch_grpo_trainer(normalization='global') needs steps_per_generation ({spg}) to be a multiple of "
            f"gradient_accumulation_steps ({gas}): an optimizer step must not span two generation batches, "
            "whose totals are counted when each is generated")
    if not hasattr(trainer, "_prepare_inputs") or not hasattr(trainer, "_buffered_inputs"):
        raise NotImplementedError("patch_grpo_trainer(normalization='global') needs TRL's buffered generation "
                                  "batch (GRPOTrainer._prepare_inputs / _buffered_inputs, TRL 1.x)")


def _wrap_prepare_inputs(trainer, state):
    """Count the optimizer-step totals whenever ``_prepare_inputs`` returns from a generation batch
    that is not counted yet: a new one TRL buffered, or the one buffered before the patch (patched between
    two steps of a generation batch)."""
    original = trainer._prepare_inputs

    @functools.wraps(original)
    def _prepare_inputs(generation_batch):
        inputs = original(generation_batch)
        buffered = trainer._buffered_inputs
        if buffered is not None and state.get("counted") is not buffered:
            state["window_totals"] = _count_windows(trainer)
            state["counted"] = buffered
        return inputs

    trainer._prepare_inputs = _prepare_inputs


def _upg_compute_loss(trainer, model, inputs, *, backend="auto"):
    """``GRPOTrainer._compute_loss`` with the policy loss from :func:`upg_kernels.unified_policy_loss`."""
    from ..losses import unified_policy_loss
    from .liger import LigerSettings

    bad = [k for k in _MM_KEYS if inputs.get(k) is not None]
    if bad:
        raise NotImplementedError(f"patch_grpo_trainer(loss=True) handles text-only batches, got {bad}")
    from trl.models.utils import _ForwardRedirection

    args = trainer.args
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    C = completion_ids.size(1)
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = _loss_mask(inputs)
    mode = "train" if trainer.model.training else "eval"

    cfg = LigerSettings.read(trainer, args).loss_config()   # TRL's settings carry Liger's names
    totals, factor = _loss_totals(trainer, inputs, mask, mode)
    advantages = inputs["advantages"]
    is_ratio = None
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        is_ratio = inputs["importance_sampling_ratio"]
    ref = inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None
    old = inputs.get("old_per_token_logps")

    def _loss(unwrapped):
        hidden = _hidden_states(unwrapped, input_ids, attention_mask, C)
        head = unwrapped.get_output_embeddings()
        ctx = contextlib.nullcontext()
        if args.cast_lm_head_to_fp32:
            hidden = hidden.float()
            ctx = torch.autocast(hidden.device.type, enabled=False)
        with ctx:
            return unified_policy_loss(
                hidden, head.weight, completion_ids, config=cfg, loss_mask=mask, advantages=advantages,
                old_logprobs=old, ref_logprobs=ref, is_ratio=is_ratio, bias=head.bias,
                temperature=trainer.temperature, totals=totals, backend=backend)

    unwrapped = trainer.accelerator.unwrap_model(model)
    with trainer.accelerator.autocast():
        if unwrapped is model:
            out = _loss(unwrapped)
        else:  # DDP / FSDP / DeepSpeed wrappers: run inside the wrapper's forward (its hooks fire)
            out = _ForwardRedirection()(model, unwrapped, _loss, unwrapped)
    loss = out.loss * factor if factor != 1 else out.loss
    _log_trl_metrics(trainer, mode, out, mask, advantages, old, ref, cfg, is_ratio)
    return loss


def _log_trl_metrics(trainer, mode, out, mask, advantages, old, ref, cfg, is_ratio):
    """TRL's per-step metrics (kl, entropy, clip ratios, VESPO's phi), from the detached per-token values."""
    from trl.trainer.utils import nanmax, nanmin

    from ..losses.unified import vespo_gamma_weight

    with torch.no_grad():
        logp = out.logprobs
        mask = mask.to(logp.dtype)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = trainer.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        # the loss's own per-token values (LossOutput): KL (times the ratio with the bias correction)
        # and clip flags (sequence-level ones broadcast over the row) -- no formula written twice
        clip_low, clip_high = out.clip_low, out.clip_high
        if trainer.importance_sampling_level == "sequence":
            # TRL keeps one ratio per row ([B, 1]) and averages its flags over rows
            clip_low, clip_high = clip_low[:, :1], clip_high[:, :1]
        m = trainer._metrics[mode]
        if trainer.beta != 0.0:
            m["kl"].append(global_masked_mean(out.kl.to(logp.dtype)))
        m["entropy"].append(global_masked_mean(out.entropy))
        if trainer.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low, high = clip_low, clip_high
            m["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
            m["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
            m["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
            m["clip_ratio/low_min"].append(nanmin(trainer.accelerator.gather(masked_seq_mean(low.float()))).item())
            m["clip_ratio/high_max"].append(nanmax(trainer.accelerator.gather(masked_seq_mean(high.float()))).item())
        elif trainer.loss_type == "cispo":
            m["cispo_clip_ratio"].append(global_masked_mean(clip_high.float()))
        elif trainer.loss_type == "vespo":
            # TRL logs the per-sequence weight (its get_gamma_weights: the IS logs summed over every position)
            lr = logp - (logp if old is None else old.to(logp.dtype))
            log_w = (torch.clamp(lr, -20.0, 20.0) * mask).sum(-1, keepdim=True)
            if is_ratio is not None:
                isr = is_ratio.to(logp.dtype)
                isr = isr.unsqueeze(-1) if isr.dim() == 1 else isr
                log_w = log_w + torch.clamp(torch.log(isr), math.log(1e-8), 20.0).sum(-1, keepdim=True)
            phi = vespo_gamma_weight(log_w, adv, k_pos=cfg.vespo_k_pos, lambda_pos=cfg.vespo_lambda_pos,
                                     k_neg=cfg.vespo_k_neg, lambda_neg=cfg.vespo_lambda_neg)
            m["vespo/phi_seq_mean"].append(global_masked_mean(phi))
