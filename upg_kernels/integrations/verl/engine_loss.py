"""The whole actor loss as one verl engine loss function: :func:`upg_ppo_loss`, a drop-in for verl 0.9.1's
``verl.workers.utils.losses.ppo_loss``.

verl's ``ppo_loss`` calls the registered policy loss, then adds ``-entropy_coeff * agg_loss(entropy)`` and
``kl_loss_coef * agg_loss(kl_penalty(logp, ref))`` as two more autograd graphs. Here the policy term, the
entropy bonus and the KL loss are the per-token loss of ONE :func:`upg_kernels.policy_loss_from_logprobs`
call (:func:`.losses.verl_loss`: our ``entropy_coef`` / ``kl_coef`` / ``kl_type`` set on the config of
:func:`.losses.verl_loss_config`): one epilogue, one aggregation, and one backward whose per-token
coefficients go to the log-probs and the entropy. With ``impl_backend=upg`` (:mod:`.kernel`) those come
from our fused kernel :func:`upg_kernels.token_logprobs`, whose backward skips every row whose
coefficients are exactly zero -- with ``entropy_coeff=0`` and no KL loss, the zero-advantage rows.

Inputs, outputs and metrics are verl's: ``model_output["log_probs"]`` / ``["entropy"]`` (nested, over the
whole sequences, or padded), ``data`` with ``response_mask``, ``old_log_probs``, ``advantages``, optional
``rollout_is_weights`` and ``ref_log_prob``, and ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size``;
the metrics ``actor/pg_loss``, ``actor/entropy_loss``, ``kl_loss``, ``kl_coef`` and the policy loss's
``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``, with verl's aggregation types.

Differences from verl's ``ppo_loss`` (docs/integrations.md, "verl"):

* ``actor.policy_loss.loss_mode`` must be ``upg_fused_<preset>`` (what :func:`install_engine_loss` routes
  here) or ``upg_<preset>`` (when set with ``set_loss_fn``); verl's own modes keep verl's ``ppo_loss``;
* ``kl_loss_type``: ``low_var_kl``/``k3`` -> our ``k3``, ``kl``/``k1`` -> ``k1``, ``mse``/``k2`` -> ``k2``; the
  others (``abs``, ``full``, the straight-through ``k1+``/``k3+``) raise ValueError. verl clamps
  ``low_var_kl`` (``ref - logp`` to [-20, 20], the estimate to [-10, 10]); ours is the unclamped
  ``exp(ref - logp) - (ref - logp) - 1``: equal (value and gradient) while the estimate is below 10,
  i.e. ``logp - ref`` between about -2.61 and 11.0;
* ``upg_sapo`` with an entropy bonus or a KL loss needs ``loss_agg_mode=seq-mean-token-mean``: verl's sapo
  aggregates its policy term that way whatever ``loss_agg_mode`` says, but the entropy and KL terms with
  ``loss_agg_mode``, and one fused loss has one aggregation (ValueError otherwise);
* ``entropy_coeff`` must be >= 0 (our ``LossConfig.entropy_coef``); when the model gives no entropy
  (``calculate_entropy=False``), there is no entropy term or metric, as in verl.
"""
from __future__ import annotations

import functools

import torch

from ...losses.aggregation import aggregation_weights
from .losses import clip_range, config_get, verl_metrics, verl_scale, sapo_agg_mode, verl_loss

__all__ = ["upg_ppo_loss", "VERL_KL_TYPES", "install_engine_loss", "FUSED_PREFIX"]

# verl kl_loss_type -> our LossConfig.kl_type
VERL_KL_TYPES = {"low_var_kl": "k3", "k3": "k3", "kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2"}
FUSED_PREFIX = "upg_fused_"   # loss_mode=upg_fused_<preset>: the engine worker trains with upg_ppo_loss


def _preset(config) -> str:
    mode = config_get(config_get(config, "policy_loss"), "loss_mode", "vanilla")
    for prefix in (FUSED_PREFIX, "upg_"):
        if isinstance(mode, str) and mode.startswith(prefix):
            return mode[len(prefix):]
    raise ValueError(f"upg_ppo_loss needs actor.policy_loss.loss_mode=upg_<preset> or upg_fused_<preset>, got "
                     f"{mode!r} (verl's own loss modes run with verl's ppo_loss)")


def _kl_type(config) -> str:
    kind = config_get(config, "kl_loss_type", "low_var_kl")
    if kind not in VERL_KL_TYPES:
        raise ValueError(f"actor.kl_loss_type must be one of {list(VERL_KL_TYPES)} with upg_ppo_loss, got {kind!r}")
    return VERL_KL_TYPES[kind]


def _agg_like_verl(x, mask, mode, info):
    """verl's ``agg_loss(x, mask, mode, **info)`` of a detached per-token tensor, by our aggregation."""
    agg, n_items, factor = verl_scale(mode, mask, info)
    rows = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    w = aggregation_weights(mask, rows, agg, None, "verl metric", n_tokens=n_items,
                            dtype=torch.float32)
    return (w * torch.where(mask, x.detach().float(), torch.zeros_like(w))).sum() * factor


def upg_ppo_loss(config, model_output, data, dp_group=None):
    """verl's engine ``loss_fn(config, model_output, data, dp_group) -> (loss, metrics)`` with the policy
    term, the entropy bonus and the KL loss in one fused loss (module docstring)."""
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    preset = _preset(config)
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)

    info = config.global_batch_info   # verl's ppo_loss fills it the same way (the policy loss reads it)
    info["dp_size"] = data["dp_size"]
    info["batch_num_tokens"] = data["batch_num_tokens"]
    info["global_batch_size"] = data["global_batch_size"]
    info["loss_scale_factor"] = config.loss_scale_factor
    global_norm = (data["dp_size"] > 1 or data["batch_num_tokens"] is not None
                   or data["global_batch_size"] is not None or config.loss_scale_factor is not None)
    agg_type = AggregationType.SUM if global_norm else AggregationType.MEAN

    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data]
    batch = data.select(*fields).to_padded_tensor()
    mask = batch["response_mask"].to(torch.bool)
    mode = config.loss_agg_mode

    entropy_coef = float(config.entropy_coeff) if entropy is not None else 0.0
    use_kl = bool(config.use_kl_loss)
    kl_coef = float(config.kl_loss_coef) if use_kl else 0.0
    kw = dict(entropy_coef=entropy_coef, kl_coef=kl_coef)
    if use_kl:
        kw["kl_type"] = _kl_type(config)
        if "ref_log_prob" not in batch:
            raise ValueError("actor.use_kl_loss=True needs data['ref_log_prob'] (the reference model's log-probs)")
    forced = sapo_agg_mode(preset)
    if forced and mode != forced and (entropy_coef != 0 or kl_coef != 0):
        raise ValueError(f"upg_{preset} aggregates its policy term with {forced!r} (as verl's sapo) but "
                         f"loss_agg_mode={mode!r} would aggregate the entropy/KL terms differently; one fused "
                         f"loss has one aggregation: set actor.loss_agg_mode={forced}, or entropy_coeff=0 and "
                         "use_kl_loss=False, or use verl's ppo_loss")
    ref = batch["ref_log_prob"] if use_kl else None
    loss, out, cfg = verl_loss(preset, log_prob, batch["old_log_probs"], batch["advantages"], mask, forced or mode,
                               config, batch.get("rollout_is_weights", None), entropy=entropy, ref_log_prob=ref,
                               **kw)

    low, high = clip_range(config)
    metrics = Metric.from_dict(verl_metrics(cfg, out, log_prob, batch["old_log_probs"].detach(), mask, low, high),
                               aggregation=AggregationType.MEAN)
    pg_loss = loss.detach()
    if entropy is not None:
        entropy_loss = _agg_like_verl(out.entropy, mask, mode, info)
        pg_loss = pg_loss + entropy_coef * entropy_loss   # the loss is linear in its three terms
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=agg_type)
    if use_kl:
        kl_loss = _agg_like_verl(out.kl, mask, mode, info)
        pg_loss = pg_loss - kl_coef * kl_loss
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=agg_type)
        metrics["kl_coef"] = config.kl_loss_coef
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=agg_type)
    return loss, metrics


def _dispatching(original):
    """verl's ``ppo_loss``, routed to :func:`upg_ppo_loss` when ``loss_mode`` is ``upg_fused_<preset>``."""

    @functools.wraps(original)
    def ppo_loss(config, model_output, data, dp_group=None):
        mode = config_get(config_get(config, "policy_loss"), "loss_mode", "vanilla")
        if isinstance(mode, str) and mode.startswith(FUSED_PREFIX):
            return upg_ppo_loss(config, model_output, data, dp_group)
        return original(config, model_output, data, dp_group)

    ppo_loss._upg_original = original
    return ppo_loss


def install_engine_loss():
    """Make ``actor.policy_loss.loss_mode=upg_fused_<preset>`` select :func:`upg_ppo_loss` as the engine
    worker's loss (idempotent): verl's ``ppo_loss`` is wrapped where the engine worker takes it from."""
    import sys

    import verl.workers.utils.losses as losses_mod

    if not hasattr(losses_mod.ppo_loss, "_upg_original"):
        losses_mod.ppo_loss = _dispatching(losses_mod.ppo_loss)
    workers = sys.modules.get("verl.workers.engine_workers")   # imported before the plugin: patch it too
    if workers is not None and not hasattr(workers.ppo_loss, "_upg_original"):
        workers.ppo_loss = losses_mod.ppo_loss
