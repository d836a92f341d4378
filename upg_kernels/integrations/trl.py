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
``loss_type``\ s (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo; token or sequence level; beta, with or
without ``use_bias_correction_kl``; delta; vLLM IS correction) is then computed by :func:`upg_kernels.unified_policy_loss` from the backbone's last hidden
states and the lm_head (one fused pass; the backward skips rows whose gradient coefficient is 0), with TRL's
normalizers (gradient accumulation, ``num_items_in_batch``) and TRL's logged metrics. Options this mode
does not cover raise ``NotImplementedError`` when patching (see :func:`patch_grpo_trainer`).

Usage::

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    patch_grpo_trainer(trainer)            # or patch_grpo_trainer(trainer, loss=True)
    trainer.train()
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from ..logprobs import token_logprobs

__all__ = ["patch_grpo_trainer", "unpatch_grpo_trainer", "UPGChunkedLogProbFunction", "is_patched"]

_SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy"})
_DEFAULT_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's OPTIONAL_OUTPUTS
_lock = threading.RLock()


class UPGChunkedLogProbFunction:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction`` with the same ``apply`` signature and outputs.

    ``apply(hidden [N,H], weight [V,H], bias, targets [N], temperature, chunk_size, final_logit_softcapping,
    logit_scale, outputs)`` returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``; TRL's
    logits transform is ``softcap(logit_scale * (h @ W.T + b)) / temperature``. ``log_probs`` and ``entropy``
    come from :func:`upg_kernels.token_logprobs` (``logit_scale`` is folded into ``h`` and ``b``, which is
    exact). When a caller asks for one of the other outputs (TRL's GRPOTrainer never does), the call goes to
    ``fallback`` (TRL's own function).
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
        return logp, ent, None, None, None


def _make_kernel_class(backend: str, fallback):
    return type("UPGChunkedLogProbFunction", (UPGChunkedLogProbFunction,),
                {"backend": backend, "fallback": fallback})


def is_patched(trainer) -> bool:
    return getattr(trainer, "_upg_kernels_patch", None) is not None


def patch_grpo_trainer(trainer, *, backend: str = "auto", replace_liger_loss: bool = True, loss: bool = False):
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

    Idempotent; returns the trainer. :func:`unpatch_grpo_trainer` undoes it.
    """
    if is_patched(trainer):
        return trainer
    try:
        import trl.trainer.utils as trl_utils
    except ImportError as exc:  # pragma: no cover - exercised only without TRL
        raise ImportError("patch_grpo_trainer needs TRL installed (pip install trl)") from exc
    if not hasattr(trainer, "_get_per_token_logps_and_entropies") and not hasattr(trainer, "liger_grpo_loss"):
        raise TypeError(f"{type(trainer).__name__} does not look like a trl.GRPOTrainer: it has neither "
                        "_get_per_token_logps_and_entropies nor liger_grpo_loss")
    state = {}
    original_kernel = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if hasattr(trainer, "_get_per_token_logps_and_entropies") and original_kernel is not None:
        kernel = _make_kernel_class(backend, original_kernel)
        original_method = trainer._get_per_token_logps_and_entropies  # bound method

        @functools.wraps(original_method)
        def _patched(*args, **kwargs):
            with _lock:
                saved = trl_utils._ChunkedLogProbFunction
                trl_utils._ChunkedLogProbFunction = kernel
                try:
                    return original_method(*args, **kwargs)
                finally:
                    trl_utils._ChunkedLogProbFunction = saved

        trainer._get_per_token_logps_and_entropies = _patched
        state["method"] = True
        state["kernel"] = kernel
    elif hasattr(trainer, "_get_per_token_logps_and_entropies"):
        # a TRL without the fused LM head: nothing to swap on the log-prob path
        state["method"] = False

    liger = getattr(trainer, "liger_grpo_loss", None)
    if replace_liger_loss and liger is not None:
        from .liger import FusedLinearGRPOLoss
        state["liger_grpo_loss"] = liger
        trainer.liger_grpo_loss = FusedLinearGRPOLoss.from_liger(liger, backend=backend)
    if loss:
        _check_loss_mode(trainer)
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
    if state.get("method"):
        del trainer._get_per_token_logps_and_entropies  # the class method shows through again
    if "liger_grpo_loss" in state:
        trainer.liger_grpo_loss = state["liger_grpo_loss"]
    if "compute_loss" in state:
        del trainer._compute_loss
    trainer._upg_kernels_patch = None
    return trainer


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


def _upg_compute_loss(trainer, model, inputs, *, backend="auto"):
    """``GRPOTrainer._compute_loss`` with the policy loss from :func:`upg_kernels.unified_policy_loss`."""
    from ..losses import unified_policy_loss
    from .liger import liger_loss_config

    bad = [k for k in _MM_KEYS if inputs.get(k) is not None]
    if bad:
        raise NotImplementedError(f"patch_grpo_trainer(loss=True) handles text-only batches, got {bad}")
    from trl.models.utils import _ForwardRedirection

    args = trainer.args
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    C = completion_ids.size(1)
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if trainer.model.training else "eval"
    gas = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0

    cfg = liger_loss_config(
        trainer.loss_type, beta=trainer.beta, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
        max_completion_length=trainer.max_completion_length,
        importance_sampling_level=trainer.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        delta=args.delta, use_bias_correction_kl=getattr(args, "use_bias_correction_kl", False),
        vespo_k_pos=getattr(args, "vespo_k_pos", 2.0), vespo_lambda_pos=getattr(args, "vespo_lambda_pos", 3.0),
        vespo_k_neg=getattr(args, "vespo_k_neg", 3.0), vespo_lambda_neg=getattr(args, "vespo_lambda_neg", 2.0))
    # TRL's normalizers: every type is divided by the accumulation steps, except dapo/cispo/vespo whose token
    # count spans the generation batch
    if trainer.loss_type in ("dapo", "cispo", "vespo"):
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / args.steps_per_generation
        n_items = 1.0  # token_mean over 1 = the masked sum; divided by TRL's normalizer below
    else:
        normalizer = gas
        n_items = None
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
                temperature=trainer.temperature, num_items_in_batch=n_items, backend=backend)

    unwrapped = trainer.accelerator.unwrap_model(model)
    with trainer.accelerator.autocast():
        if unwrapped is model:
            out = _loss(unwrapped)
        else:  # DDP / FSDP / DeepSpeed wrappers: run inside the wrapper's forward (its hooks fire)
            out = _ForwardRedirection()(model, unwrapped, _loss, unwrapped)
    loss = out.loss / normalizer
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
