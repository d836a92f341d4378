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
  these normalisers are passed to :func:`unified_policy_loss` as the call's :class:`upg_kernels.BatchTotals`
  (:func:`normalizer_totals`); ``forward(..., totals=batch_totals(...))`` replaces them by the whole batch's
  counts, exact over micro-batches and ranks for every loss type (the loss is then multiplied by
  ``totals.world_size``, which compensates DDP's mean, as Liger's ``/ world`` does for dapo);
* metrics, in this order: ``[mean KL]`` (only when ``beta != 0``: ``sum(kl m) / max(sum(m), 1)``, ``kl`` the term
  as added, bias-corrected or not), then the clip fraction ``sum(clipped m) / max(sum(m), 1)`` with
  ``clipped = (r < 1-eps_low & A < 0) | (r > 1+eps_high & A > 0)`` (cispo: ``r > eps_high & A > 0``; sapo and
  vespo: always 0). Each metric is a detached float32 0-dim tensor; they come back as a tuple. They are
  ``unified_policy_loss``'s ``kl_mean`` and ``clip_frac`` metrics.

Padded positions (``attention_mask == 0``): Liger 0.8.5 counts them in luspo when its per-token loss is
``[B, T]``-shaped (token level, or ``beta != 0``, or a ``[B, T]`` ``vllm_is_ratio``): ``sum_{i,t} l_it len_i / (B T)``
over *all* positions. The adapter does the same (``padded_luspo=True``, default; ``FusedLinearGRPOLoss._liger_luspo``)
or, with ``padded_luspo=False``, TRL 1.16's masked ``sum_i sum_t m l_it / B``. vespo with a ``[B, T]``
``vllm_is_ratio``: Liger sums its logs over all positions, we over the valid tokens (equal when the ratio is 1
at padded positions, as TRL produces it).

Accepted and ignored: ``compiled`` and ``chunk_size`` (Liger's torch.compile / batch chunking; our kernel
never materializes logits and needs neither).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import torch

from ..logprobs import token_logprobs

__all__ = ["FusedLinearGRPOLoss", "LIGER_LOSS_TYPES", "LigerSettings", "liger_loss_config", "normalizer_totals",
           "DAPO_NORMALIZED"]

# Liger 0.8.5's loss types; each is the preset of the same name in upg_kernels' PRESETS (losses/config.py),
# whose stabilization and aggregation the adapter takes. The IS level is Liger's own setting, so the
# presets' sequence clip (luspo) is the token clip here, applied at importance_sampling_level.
LIGER_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_IS_LEVELS = ("token", "sequence")
# the loss types whose token_mean is over num_items_in_batch (Liger's _compute_dapo_normalizer)
DAPO_NORMALIZED = ("dapo", "cispo", "vespo")


def _loss_type_parts(loss_type):
    """``(stabilization, aggregation)`` of a Liger loss type, read from the preset table."""
    from ..losses.config import PRESETS

    row = PRESETS[loss_type]
    stab = "clip" if row["stabilization"] == "seq_clip" else row["stabilization"]
    return stab, row["aggregation"]


@dataclasses.dataclass
class LigerSettings:
    """``LigerFusedLinearGRPOLoss``'s constructor arguments (liger-kernel 0.8.5), in Liger's order and with
    Liger's defaults: the one list of them (the adapter, ``from_liger`` and TRL's ``loss=True`` read it).
    TRL 1.16's ``GRPOConfig``/``GRPOTrainer`` use the same names."""

    beta: float = 0.04
    compiled: bool = True
    use_ref_model: bool = True
    chunk_size: int = 1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: int | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    temperature: float = 1.0
    delta: float | None = None
    use_bias_correction_kl: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    @classmethod
    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def read(cls, *sources, **overrides):
        """Settings from the first of ``sources`` (objects) that has each attribute, then ``overrides``."""
        kw = {}
        for name in cls.names():
            for src in sources:
                if hasattr(src, name):
                    kw[name] = getattr(src, name)
                    break
        kw.update(overrides)
        return cls(**kw)

    def check_init(self):
        """What Liger's ``__init__`` refuses (everything else is refused at ``forward``, as Liger does)."""
        if self.sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {self.sapo_temperature_pos}")
        if self.sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {self.sapo_temperature_neg}")
        if self.delta is not None and self.delta <= 0:
            raise ValueError(f"delta must be positive, got {self.delta}")

    def loss_config(self):
        """The :class:`upg_kernels.LossConfig` equal to Liger's GRPO loss with these settings.

        ``beta`` becomes ``kl_coef`` with ``kl_type="k3"``, ``use_bias_correction_kl`` becomes
        ``kl_bias_correction``; the advantages are always the caller's (``advantage="given"``). The ``vespo_*``
        rates are floored at 1e-4 as Liger/TRL do.
        """
        from ..losses import LossConfig

        lt, level = self.loss_type, self.importance_sampling_level
        if lt not in LIGER_LOSS_TYPES:
            raise ValueError(f"Unknown loss type: {lt!r}; supported: {LIGER_LOSS_TYPES}")
        if level not in _IS_LEVELS:
            raise ValueError(f"Unknown importance sampling level: {level!r}. Possible values "
                             "are 'token' and 'sequence'.")
        if level == "sequence" and lt in ("cispo", "sapo", "vespo"):
            raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{lt}'. "
                             "Use importance_sampling_level='token' instead.")
        if lt == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        stab, agg = _loss_type_parts(lt)
        kw = dict(stabilization=stab, reference="old", advantage="given", likelihood="logp", aggregation=agg,
                  ratio_level=level, eps_low=float(self.epsilon_low), eps_high=float(self.epsilon_high),
                  kl_type="k3", kl_coef=float(self.beta), kl_bias_correction=bool(self.use_bias_correction_kl),
                  entropy_coef=0.0, tau_pos=float(self.sapo_temperature_pos),
                  tau_neg=float(self.sapo_temperature_neg))
        if stab == "vespo":
            kw.update(vespo_k_pos=float(self.vespo_k_pos), vespo_k_neg=float(self.vespo_k_neg),
                      vespo_lambda_pos=max(float(self.vespo_lambda_pos), 1e-4),
                      vespo_lambda_neg=max(float(self.vespo_lambda_neg), 1e-4))
        if stab == "clip":
            kw["delta"] = None if self.delta is None else float(self.delta)
        if lt == "dr_grpo":
            kw["max_completion_length"] = int(self.max_completion_length)
        return LossConfig(**kw)


def liger_loss_config(loss_type="dapo", **settings):
    """The :class:`upg_kernels.LossConfig` of Liger's GRPO loss: ``LigerSettings(loss_type, **settings)``."""
    return LigerSettings(loss_type=loss_type, **settings).loss_config()


def normalizer_totals(loss_type, mask, *, dapo_count=None, world: int = 1, accumulation: int = 1):
    """Liger's and TRL's normalisers of one loss call as ``(totals, factor)``: the call's
    :class:`upg_kernels.BatchTotals` and the factor with which
    ``unified_policy_loss(..., totals=totals).loss * factor`` is the framework's loss (the one code path of
    both drop-ins; :func:`upg_kernels.batch_totals` gives the exact totals, whose factor is ``world_size``).

    ``mask`` is the call's ``[B, T]`` loss mask. ``accumulation``: TRL divides every type but dapo/cispo/vespo
    by the gradient accumulation steps (Liger: 1), i.e. counts ``accumulation`` times this call's rows
    (bnpo: tokens, at least 1). dapo/cispo/vespo divide the masked sum by ``dapo_count / world`` (a real
    number of tokens, compensated for DDP's mean over ``world`` processes): Liger's
    ``max(num_items_in_batch, world)``, TRL's ``max(num_items_in_batch, 1) * accumulation / steps_per_generation``.
    The totals then count ``K = max(ceil(dapo_count), local tokens, 1)`` tokens and ``factor = world * K /
    dapo_count`` (``= world`` when ``dapo_count`` is a whole number of at least the local tokens).
    """
    from ..losses import BatchTotals

    if loss_type not in LIGER_LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type!r}; supported: {LIGER_LOSS_TYPES}")
    B = mask.shape[0]
    tok = int((mask != 0).sum())
    if loss_type in DAPO_NORMALIZED:
        count = float(dapo_count)
        if not count > 0:
            raise ValueError(f"the dapo/cispo/vespo normaliser must be > 0, got {count}")
        K = max(math.ceil(count), tok, 1)
        return BatchTotals(main_tokens=K, main_rows=B, world_size=int(world)), world * K / count
    if loss_type == "bnpo":
        return BatchTotals(main_tokens=max(tok, 1) * accumulation, main_rows=B), 1.0
    return BatchTotals(main_tokens=tok, main_rows=B * accumulation), 1.0


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
    ref_weight=None, ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None, totals=None)`` returns
    ``(loss, metrics)``: a float32 scalar with gradients to ``_input``, ``lin_weight`` and ``bias``, and the
    tuple ``(kl_mean, clip_ratio)`` (``(clip_ratio,)`` when ``beta == 0``). See the module docstring for the
    exact semantics.

    ``totals`` (ours; not with ``num_items_in_batch``): the :class:`upg_kernels.BatchTotals` of the whole batch
    of the optimizer step, from :func:`upg_kernels.batch_totals` (the attention masks of every micro-batch;
    ``group=`` under DDP). Every loss type then divides by those counts: the micro-batches' (and ranks')
    losses and gradients add up to the whole batch's call; the loss is multiplied by ``totals.world_size``
    (DDP averages the ranks' gradients). luspo then takes the masked form (``padded_luspo`` does not apply:
    Liger's padded weighting depends on each call's padded length).
    """

    def __init__(self, *args, backend: str = "auto", padded_luspo: bool = True, **kwargs):
        super().__init__()
        settings = LigerSettings(*args, **kwargs)
        settings.check_init()
        for name in LigerSettings.names():   # plain attributes, as in Liger (re-read at every forward)
            setattr(self, name, getattr(settings, name))
        self.backend = backend
        # luspo with a [B, T]-shaped Liger loss: Liger's weighting of every position, padding included (True,
        # the drop-in's default) or TRL 1.16's masked sum (False)
        self.padded_luspo = bool(padded_luspo)

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_liger(cls, liger_module, *, backend: str = "auto") -> "FusedLinearGRPOLoss":
        """Build from a ``LigerFusedLinearGRPOLoss`` instance, copying its settings."""
        return cls(**dataclasses.asdict(LigerSettings.read(liger_module)), backend=backend)

    @property
    def settings(self) -> LigerSettings:
        return LigerSettings.read(self)

    @property
    def config(self):
        """The :class:`upg_kernels.LossConfig` of the current settings (raises on settings Liger refuses)."""
        return self.settings.loss_config()

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"temperature={self.temperature}, backend={self.backend!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None, totals=None):
        from ..losses import unified_policy_loss

        # the settings are plain attributes (as in Liger): re-read them on every call
        config = self.config
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

        # the normaliser as totals: the caller's (exact over micro-batches and ranks), or Liger's own
        exact = totals is not None
        if exact:
            if num_items_in_batch is not None:
                raise ValueError("pass totals (upg_kernels.batch_totals of the whole batch) or num_items_in_batch "
                                 "(Liger's dapo/cispo/vespo normaliser), not both")
            factor = getattr(totals, "world_size", 1)   # a wrong type is refused by the loss
        else:
            dapo_count, world = None, _world_size()
            if self.loss_type in DAPO_NORMALIZED:   # num_items_in_batch, or the token count over the group
                if num_items_in_batch is not None:
                    n = float(num_items_in_batch)
                else:
                    n = mask.sum()
                    if world > 1:
                        n = n.clone()
                        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.SUM)
                    n = float(n)
                dapo_count = max(n, world)   # Liger: max(n / world, 1)
            totals, factor = normalizer_totals(self.loss_type, mask, dapo_count=dapo_count, world=world)

        old = None if old_per_token_logps is None else old_per_token_logps.float()
        # Liger's padded luspo weights every position by 1 / (B T): per call, so never with the caller's totals
        if self.loss_type == "luspo" and self.padded_luspo and not exact and not self.use_bias_correction_kl and (
                config.ratio_level == "token" or use_kl
                or (vllm_is_ratio is not None and vllm_is_ratio.dim() == 2 and vllm_is_ratio.shape[1] == T > 1)):
            return self._liger_luspo(_input, lin_weight, selected_token_ids, mask, advantages.float(), bias, old,
                                     ref if use_kl else None, vllm_is_ratio, config)
        out = unified_policy_loss(
            _input, lin_weight, selected_token_ids, config=config, loss_mask=mask,
            advantages=advantages.float(), old_logprobs=old, ref_logprobs=ref if use_kl else None,
            is_ratio=vllm_is_ratio, bias=bias, temperature=self.temperature, totals=totals, backend=self.backend)
        loss = out.loss * factor if factor != 1 else out.loss
        m = out.metrics
        metrics = []
        if self.beta != 0.0:
            metrics.append(m["kl_mean"] if use_kl else 0.0)
        metrics.append(m["clip_frac"])
        dev = loss.device
        return loss, tuple(torch.tensor(v, dtype=torch.float32, device=dev) for v in metrics)

    def _liger_luspo(self, x, w, ids, mask, adv, bias, old, ref, isr, config):
        """Liger 0.8.5's luspo when its per-token loss is ``[B, T]``-shaped: ``sum_{i,t} l_it len_i / (B T)`` over
        every position, padding included (``len_i = sum_t m``). One kernel pass gives the log-probs at every
        position; the policy part and the KL part are two epilogues on them (the KL weighted per row)."""
        from ..losses import LossConfig, policy_loss_from_logprobs

        B, T = ids.shape
        lp = token_logprobs(x, w, ids, bias=bias, temperature=self.temperature, backend=self.backend)
        lens = mask.sum(-1)
        ones = torch.ones_like(mask)
        pol_cfg = config.replace(kl_coef=0.0)
        if config.ratio_level == "sequence":   # l_i per row: sum_t l_i isr_it len_i / (B T) = len_i l_i mean_t(isr) / B
            if isr is not None and isr.dim() == 2 and isr.shape[1] == T:
                isr = isr.mean(-1)
            pol = policy_loss_from_logprobs(lp, config=pol_cfg, loss_mask=mask, advantages=adv, old_logprobs=old,
                                            is_ratio=isr)
            clip = pol.metrics["clip_frac"]
        else:   # token level: every position, weight 1/(B T) times len_i (in the advantage: len_i >= 0)
            pol = policy_loss_from_logprobs(lp, config=pol_cfg.replace(aggregation="seq_mean_token_mean"),
                                            loss_mask=ones, advantages=adv * lens, old_logprobs=old, is_ratio=isr)
            clipped = (pol.clip_low | pol.clip_high).float()
            clip = float((clipped * mask).sum() / mask.sum().clamp(min=1.0))
        loss, metrics = pol.loss, []
        if ref is not None:
            kl_cfg = LossConfig(stabilization="none", reference="old", advantage="given", likelihood="logp",
                                aggregation="seq_mean_token_mean", kl_type="k3", kl_coef=float(self.beta))
            kl = policy_loss_from_logprobs(lp, config=kl_cfg, loss_mask=ones, advantages=torch.zeros_like(adv),
                                           old_logprobs=lp.detach(), ref_logprobs=ref)
            row = lens[:, None] / (B * T)
            value = (float(self.beta) * kl.kl * row).sum()
            loss = loss + value.detach() + ((-kl.coef_logp) * lens[:, None] * (lp - lp.detach())).sum()
            metrics.append(float((kl.kl * mask).sum() / mask.sum().clamp(min=1.0)))
        elif self.beta != 0.0:
            metrics.append(0.0)
        metrics.append(clip)
        dev = loss.device
        return loss, tuple(torch.tensor(v, dtype=torch.float32, device=dev) for v in metrics)


# the constructor's signature is LigerSettings' (Liger's order and defaults) plus our keyword-only backend
FusedLinearGRPOLoss.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
       for p in inspect.signature(LigerSettings).parameters.values()]
    + [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str),
       inspect.Parameter("padded_luspo", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)])
