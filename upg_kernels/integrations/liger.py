"""Drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (liger-kernel 0.8.5), on :func:`unified_policy_loss`.

``FusedLinearGRPOLoss`` takes the same constructor arguments, the same ``forward`` arguments and returns the
same ``(loss, metrics)`` as ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``; it is a thin adapter:
Liger's arguments become a :class:`upg_kernels.LossConfig` and one :func:`upg_kernels.unified_policy_loss`
call. The loss math lives in :mod:`upg_kernels.losses` only.

Liger 0.8.5 semantics this adapter reproduces (read from ``liger_kernel/chunked_loss/grpo_loss.py`` and
``fused_linear_ppo.py``); ``r = exp(logp - old)`` (``old = sg(logp)`` when ``old_per_token_logps`` is None),
for ``importance_sampling_level="sequence"`` ``r_i = exp(sum_t m (logp - old) / max(sum_t m, 1))``:

* per-token policy loss: grpo/bnpo/dr_grpo/dapo/luspo ``-min(min(r, delta) A, clip(r, 1-eps_low, 1+eps_high) A)``;
  cispo ``-sg(min(r, eps_high)) A logp``; sapo ``-(4/tau) sigmoid(tau (r - 1)) A`` with
  ``tau = sapo_temperature_pos if A > 0 else sapo_temperature_neg``; vespo ``-sg(phi(w_i)) A logp`` with the
  gamma weight ``phi`` of the sequence ratio ``w_i = exp(sum_t m clamp(logp - old, -20, 20))`` (token level only);
* ``vllm_is_ratio`` multiplies the policy loss (not the KL term); for vespo it is folded into ``w_i`` instead
  (``+ sum log(vllm_is_ratio)``, each log clamped to ``[log 1e-8, 20]``);
* ``beta * k3`` added, ``k3 = exp(ref - logp) - (ref - logp) - 1`` (zero when ``use_ref_model=False``, since
  Liger then uses ``ref = sg(logp)``); with ``use_bias_correction_kl`` it is ``beta * k3 * r``, ``r`` the
  unclamped, differentiable ratio of the importance-sampling level;
* aggregation: grpo/sapo ``sum_i(sum_t l m / max(sum_t m, 1)) / B``; bnpo ``sum(l m) / max(sum(m), 1)``;
  dr_grpo ``sum(l m) / (B * max_completion_length)``; dapo/cispo/vespo ``sum(l m) / max(n / world, 1)`` with
  ``n = num_items_in_batch`` or the mask's token count summed over the process group; luspo
  ``sum_i len_i l_i / B`` (``len_i = sum_t m``), i.e. ``sum(l m) / B``;
* metrics, in this order: ``[mean KL]`` (only when ``beta != 0``: ``sum(kl m) / max(sum(m), 1)``, ``kl`` the term
  as added, bias-corrected or not), then the clip fraction ``sum(clipped m) / max(sum(m), 1)`` with
  ``clipped = (r < 1-eps_low & A < 0) | (r > 1+eps_high & A > 0)`` (cispo: ``r > eps_high & A > 0``; sapo and
  vespo: always 0). Each metric is a detached float32 0-dim tensor; they come back as a tuple. They are
  ``unified_policy_loss``'s ``kl_mean`` and ``clip_frac`` metrics.

Two places where Liger 0.8.5 itself counts padded positions (``attention_mask == 0``) and this adapter does
not (it follows TRL 1.16, which masks them): luspo when Liger's per-token loss is ``[B, T]``-shaped (token
level, or ``beta != 0``, or a ``[B, T]`` ``vllm_is_ratio``) -- Liger then computes
``sum_{i,t} l_it len_i / (B T)`` over *all* positions, padding included; and vespo with a ``[B, T]``
``vllm_is_ratio``, whose logs Liger sums over all positions. Without padding (or with the IS ratio equal to 1
at padded positions, as TRL produces it) both agree exactly.

Accepted and ignored: ``compiled`` and ``chunk_size`` (Liger's torch.compile / batch chunking; our kernel
never materializes logits and needs neither).
"""
from __future__ import annotations

import warnings

import torch

from ..logprobs import token_logprobs

__all__ = ["FusedLinearGRPOLoss", "LIGER_LOSS_TYPES", "liger_loss_config"]

LIGER_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_IS_LEVELS = ("token", "sequence")

# loss_type -> (stabilization, aggregation)
_LOSS_TYPE_PARTS = {
    "grpo": ("clip", "seq_mean_token_mean"),
    "bnpo": ("clip", "token_mean"),
    "dr_grpo": ("clip", "seq_mean_token_sum_norm"),
    "dapo": ("clip", "token_mean"),
    "cispo": ("cispo", "token_mean"),
    "sapo": ("sapo", "seq_mean_token_mean"),
    "luspo": ("clip", "seq_mean_token_sum"),
    "vespo": ("vespo", "token_mean"),
}
# the loss types whose token_mean is over num_items_in_batch (Liger's _compute_dapo_normalizer)
_DAPO_NORMALIZED = ("dapo", "cispo", "vespo")


def liger_loss_config(loss_type="dapo", *, beta=0.04, epsilon_low=0.2, epsilon_high=0.2,
                      max_completion_length=None, importance_sampling_level="token",
                      sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, delta=None,
                      use_bias_correction_kl=False, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                      vespo_lambda_neg=2.0):
    """The :class:`upg_kernels.LossConfig` equal to Liger's GRPO loss with these settings.

    ``beta`` becomes ``kl_coef`` with ``kl_type="k3"``, ``use_bias_correction_kl`` becomes
    ``kl_bias_correction``; the advantages are always the caller's (``advantage="given"``). The ``vespo_*``
    rates are floored at 1e-4 as Liger/TRL do.
    """
    from ..losses import LossConfig

    if loss_type not in _LOSS_TYPE_PARTS:
        raise ValueError(f"Unknown loss type: {loss_type!r}; supported: {LIGER_LOSS_TYPES}")
    if importance_sampling_level not in _IS_LEVELS:
        raise ValueError(f"Unknown importance sampling level: {importance_sampling_level!r}. Possible values "
                         "are 'token' and 'sequence'.")
    if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
                         "Use importance_sampling_level='token' instead.")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
    stab, agg = _LOSS_TYPE_PARTS[loss_type]
    kw = dict(stabilization=stab, reference="old", advantage="given", likelihood="logp", aggregation=agg,
              ratio_level=importance_sampling_level, eps_low=float(epsilon_low), eps_high=float(epsilon_high),
              kl_type="k3", kl_coef=float(beta), kl_bias_correction=bool(use_bias_correction_kl),
              entropy_coef=0.0, tau_pos=float(sapo_temperature_pos), tau_neg=float(sapo_temperature_neg))
    if stab == "vespo":
        kw.update(vespo_k_pos=float(vespo_k_pos), vespo_k_neg=float(vespo_k_neg),
                  vespo_lambda_pos=max(float(vespo_lambda_pos), 1e-4),
                  vespo_lambda_neg=max(float(vespo_lambda_neg), 1e-4))
    if stab == "clip":
        kw["delta"] = None if delta is None else float(delta)
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = int(max_completion_length)
    return LossConfig(**kw)


def _world_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class FusedLinearGRPOLoss(torch.nn.Module):
    """``LigerFusedLinearGRPOLoss`` (liger-kernel 0.8.5) with the vocab-sized work done by upg-kernels.

    Constructor arguments are Liger's, in Liger's order; ``backend`` (keyword only) is ours
    (``"auto"``, ``"triton"``, ``"torch"``). ``compiled`` and ``chunk_size`` are accepted no-ops.
    ``forward(_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask [B, T],
    advantages [B], bias=None, ref_per_token_logps=None, old_per_token_logps=None, ref_input=None,
    ref_weight=None, ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None)`` returns
    ``(loss, metrics)``: a float32 scalar with gradients to ``_input``, ``lin_weight`` and ``bias``, and the
    tuple ``(kl_mean, clip_ratio)`` (``(clip_ratio,)`` when ``beta == 0``). See the module docstring for the
    exact semantics.
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: int | None = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0, delta: float | None = None,
                 use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *, backend: str = "auto"):
        super().__init__()
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.beta = beta
        self.compiled = compiled  # no-op
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size  # no-op
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.backend = backend
        self.config = self._build_config()  # validates the loss settings now

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_liger(cls, liger_module, *, backend: str = "auto") -> "FusedLinearGRPOLoss":
        """Build from a ``LigerFusedLinearGRPOLoss`` instance, copying its settings."""
        names = ("beta", "compiled", "use_ref_model", "chunk_size", "epsilon_low", "epsilon_high", "loss_type",
                 "max_completion_length", "importance_sampling_level", "sapo_temperature_pos",
                 "sapo_temperature_neg", "temperature", "delta", "use_bias_correction_kl", "vespo_k_pos",
                 "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
        kw = {n: getattr(liger_module, n) for n in names if hasattr(liger_module, n)}
        return cls(**kw, backend=backend)

    def _build_config(self):
        return liger_loss_config(
            self.loss_type, beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            delta=self.delta, use_bias_correction_kl=self.use_bias_correction_kl, vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"temperature={self.temperature}, backend={self.backend!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
        from ..losses import unified_policy_loss

        # the settings are plain attributes (as in Liger): re-read them on every call
        config = self._build_config()
        if not isinstance(selected_token_ids, torch.Tensor) or selected_token_ids.dim() != 2:
            raise ValueError("selected_token_ids must be a [B, T] tensor of token ids")
        B, T = selected_token_ids.shape
        if not isinstance(_input, torch.Tensor):
            raise TypeError("_input must be a torch.Tensor")
        if _input.dim() == 2 and _input.shape[0] == B * T:
            _input = _input.reshape(B, T, _input.shape[-1])
        if _input.dim() != 3 or tuple(_input.shape[:2]) != (B, T):
            raise ValueError(f"_input must have shape [B={B}, T={T}, H] (or [B*T, H]), got {tuple(_input.shape)}")
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have shape [B={B}, T={T}]")
        if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (B,):
            raise ValueError(f"advantages must have shape [B={B}], got "
                             f"{tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else advantages!r}")
        for name, t in (("old_per_token_logps", old_per_token_logps), ("ref_per_token_logps", ref_per_token_logps)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T)):
                raise ValueError(f"{name} must have shape [B={B}, T={T}]")
        mask = attention_mask.to(torch.float32)

        # reference log-probs: Liger uses them only when use_ref_model; otherwise ref = sg(logp) (KL = 0)
        ref = None
        if self.use_ref_model:
            if ref_per_token_logps is not None:
                if ref_input is not None:
                    warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")
                ref = ref_per_token_logps.float()
            elif ref_input is not None:
                if ref_weight is None:
                    raise ValueError("ref_input needs ref_weight (the reference model's lm_head weight)")
                if ref_input.dim() == 2 and ref_input.shape[0] == B * T:
                    ref_input = ref_input.reshape(B, T, ref_input.shape[-1])
                with torch.no_grad():
                    ref = token_logprobs(ref_input.detach(), ref_weight.detach(), selected_token_ids,
                                         bias=None if ref_bias is None else ref_bias.detach(),
                                         temperature=self.temperature, backend=self.backend)
            else:
                raise ValueError("If use_ref_model is True, ref_per_token_logps or ref_input must be provided")
        use_kl = self.beta != 0.0 and ref is not None
        if not use_kl:
            config = config.replace(kl_coef=0.0)

        # vLLM importance-sampling ratio: [B], [B, 1] or [B, T]; multiplies the policy term only
        if vllm_is_ratio is not None:
            if not isinstance(vllm_is_ratio, torch.Tensor) or vllm_is_ratio.dim() not in (1, 2):
                raise ValueError("vllm_is_ratio must be a [B], [B, 1] or [B, T] tensor")
            if vllm_is_ratio.dim() == 1 and vllm_is_ratio.shape[0] != B:
                raise ValueError(f"vllm_is_ratio shape must be ({B},), got {tuple(vllm_is_ratio.shape)}")
            if vllm_is_ratio.dim() == 2 and (vllm_is_ratio.shape[0] != B or vllm_is_ratio.shape[1] not in (1, T)):
                raise ValueError(f"vllm_is_ratio shape must be ({B}, 1) or ({B}, {T}), "
                                 f"got {tuple(vllm_is_ratio.shape)}")
            vllm_is_ratio = vllm_is_ratio.float()

        # dapo / cispo / vespo normalizer: num_items_in_batch (or the token count over the process group) / world
        n_items = None
        if config.aggregation == "token_mean" and self.loss_type in _DAPO_NORMALIZED:
            world = _world_size()
            if num_items_in_batch is not None:
                n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
            else:
                n = mask.sum()
                if world > 1:
                    n = n.clone()
                    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.SUM)
            n_items = torch.clamp(n / world, min=1.0)
        elif config.aggregation == "token_mean":  # bnpo: local batch token count, at least 1
            n_items = torch.clamp(mask.sum(), min=1.0)

        out = unified_policy_loss(
            _input, lin_weight, selected_token_ids, config=config, loss_mask=mask,
            advantages=advantages.float(), old_logprobs=None if old_per_token_logps is None
            else old_per_token_logps.float(), ref_logprobs=ref if use_kl else None,
            is_ratio=vllm_is_ratio, bias=bias, temperature=self.temperature,
            num_items_in_batch=n_items, backend=self.backend)
        m = out.metrics
        metrics = []
        if self.beta != 0.0:
            metrics.append(m["kl_mean"] if use_kl else 0.0)
        metrics.append(m["clip_frac"])
        dev = out.loss.device
        return out.loss, tuple(torch.tensor(v, dtype=torch.float32, device=dev) for v in metrics)
