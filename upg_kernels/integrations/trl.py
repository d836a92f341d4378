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

Usage::

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    patch_grpo_trainer(trainer)
    trainer.train()
"""
from __future__ import annotations

import functools
import threading

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


def patch_grpo_trainer(trainer, *, backend: str = "auto", replace_liger_loss: bool = True):
    """Make ``trainer`` (a ``trl.GRPOTrainer``) compute log-probs and entropies with upg-kernels.

    * TRL >= 1.x: every call of ``trainer._get_per_token_logps_and_entropies`` (policy forward in the loss,
      old- and reference-policy log-probs) runs with TRL's fused-LM-head kernel swapped for
      :class:`UPGChunkedLogProbFunction`; other trainers and models in the process are not affected.
    * Older TRL with ``use_liger_loss=True``: ``trainer.liger_grpo_loss`` is replaced by an
      :class:`upg_kernels.FusedLinearGRPOLoss` built with the same settings (``replace_liger_loss``).

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
    trainer._upg_kernels_patch = None
    return trainer
