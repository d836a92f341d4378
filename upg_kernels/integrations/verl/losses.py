"""Our presets in verl's policy-loss registry: ``actor.policy_loss.loss_mode=upg_<preset>``.

verl 0.9.1 (``verl/trainer/ppo/core_algos.py``, ``verl/workers/utils/losses.py``): ``ppo_loss`` calls the
registered ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (pg_loss, metrics)`` on ``[B, T]`` tensors, then adds ``-entropy_coeff * entropy``
and ``kl_loss_coef * kl`` itself. So each registered loss here is the *policy term only* (our
``kl_coef`` and ``entropy_coef`` are 0: nothing is counted twice) and is computed by
:func:`upg_kernels.policy_loss_from_logprobs` from verl's log-probs.

The verl settings that shape the policy term map onto :class:`upg_kernels.LossConfig`:

===============================  ==========================================================================
verl (``actor`` config)          upg-kernels
===============================  ==========================================================================
``clip_ratio(_low/_high)``       ``eps_low`` / ``eps_high`` (cispo: the weight is
                                 ``sg(clamp(r, 1 - low, 1 + high))``, as verl's ``cispo``)
``clip_ratio_c``                 ``dual_clip`` (clip presets; verl's ``vanilla`` always applies it)
``tau_pos`` / ``tau_neg``        ``tau_pos`` / ``tau_neg`` (sapo)
``rollout_is_weights [B, T]``    ``is_ratio`` (multiplies the policy term, detached)
``loss_agg_mode`` +              the aggregation, exactly as ``agg_loss``: ``token-mean``
``global_batch_info``            ``sum(l m) / batch_num_tokens * dp_size``; ``token-sum`` ``sum(l m) * dp_size``;
                                 ``seq-mean-token-sum`` ``sum_i sum_t l m / global_batch_size * dp_size``;
                                 ``-norm`` also ``/ loss_scale_factor`` (default: T); ``seq-mean-token-mean``
                                 ``sum_i mean_t(l) / global_batch_size * dp_size``; the defaults (None) are the
                                 local token count and the count of rows with a valid token
===============================  ==========================================================================

``upg_sapo`` aggregates with ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says, as verl's ``sapo``
does. Metrics carry verl's names and definitions: ``actor/pg_clipfrac`` (clipped tokens; cispo: tokens
whose ratio left ``[1 - low, 1 + high]``), ``actor/ppo_kl`` (``mean(old - logp)``), ``actor/pg_clipfrac_lower``
(dual-clipped tokens).
"""
from __future__ import annotations

import torch

from ...losses import PRESETS, LossConfig

__all__ = ["VERL_PRESETS", "verl_loss_config", "verl_policy_loss", "verl_loss", "install_losses", "VERL_AGG_MODES"]

VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")

# presets that run on [B, T] log-probs with verl's advantages: everything except the advantage-free SFT
# family and the likelihoods that need reference log-probs (verl does not hand them to a policy loss)
VERL_PRESETS = tuple(name for name, row in PRESETS.items()
                     if row["advantage"] != "one" and row["likelihood"] not in ("chi2", "hellinger"))


def config_get(config, name, default=None):
    """``config[name]`` / ``config.name`` of a verl config (dict, dataclass or OmegaConf), else ``default``."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    try:
        return config.get(name, default)  # omegaconf DictConfig, verl's BaseConfig
    except (AttributeError, TypeError):
        return getattr(config, name, default)


def clip_range(config):
    """``(low, high)`` clip epsilons of verl's actor ``config`` (``clip_ratio``, ``clip_ratio_low/high``)."""
    clip = config_get(config, "clip_ratio", 0.2)
    low = config_get(config, "clip_ratio_low")
    high = config_get(config, "clip_ratio_high")
    return float(clip if low is None else low), float(clip if high is None else high)


def verl_loss_config(preset: str, config=None) -> LossConfig:
    """The :class:`LossConfig` of ``upg_<preset>`` under verl's actor ``config`` (its policy term only)."""
    if preset not in VERL_PRESETS:
        raise ValueError(f"unknown verl preset {preset!r}; valid: {list(VERL_PRESETS)}")
    low, high = clip_range(config)
    row = PRESETS[preset]
    # verl's batches have no demonstration rows: the demonstration part and the fields only it reads go
    kw = dict(advantage="given", kl_coef=0.0, entropy_coef=0.0, demo_part=None, demo_coef=1.0, hpt_gamma=None)
    if row["stabilization"] in ("clip", "seq_clip"):
        kw.update(eps_low=low, eps_high=high)
    if row["stabilization"] == "clip":
        kw["dual_clip"] = float(config_get(config, "clip_ratio_c", 3.0))
    if row["stabilization"] == "cispo":
        kw["eps_high"] = 1.0 + high   # absolute cap; the lower clamp 1 - low is applied in verl_policy_loss
    if row["stabilization"] == "sapo":
        kw.update(tau_pos=float(config_get(config, "tau_pos", row.get("tau_pos", 1.0))),
                  tau_neg=float(config_get(config, "tau_neg", row.get("tau_neg", 1.05))))
    # aggregation is applied by _aggregate_like_verl (token sums or per-row token means, then verl's scale)
    kw["aggregation"] = "seq_mean_token_mean"
    return LossConfig.preset(preset, **kw)


def verl_scale(mode, mask, info):
    """Our loss -> verl's ``agg_loss``: ``(our aggregation, num_items_in_batch, factor)``."""
    dp = float(info.get("dp_size") or 1)
    rows = (mask.sum(-1) > 0).sum().to(torch.float32)
    B = mask.shape[0]
    if mode == "token-mean":
        n = info.get("batch_num_tokens")
        n = mask.sum().to(torch.float32) if n is None else torch.as_tensor(n, dtype=torch.float32)
        return "token_mean", 1.0, dp / n.clamp(min=1e-30)
    if mode == "token-sum":
        return "token_mean", 1.0, dp
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        g = info.get("global_batch_size")
        g = rows if g is None else torch.as_tensor(g, dtype=torch.float32)
        factor = dp / g.clamp(min=1e-30)
        if mode == "seq-mean-token-sum-norm":
            lsf = info.get("loss_scale_factor")
            factor = factor / float(mask.shape[-1] if lsf is None else lsf)
        return "token_mean", 1.0, factor
    if mode == "seq-mean-token-mean":
        g = info.get("global_batch_size")
        g = rows if g is None else torch.as_tensor(g, dtype=torch.float32)
        return "seq_mean_token_mean", None, dp * B / g.clamp(min=1e-30)
    raise ValueError(f"loss_agg_mode must be one of {list(VERL_AGG_MODES)}, got {mode!r}")


def sapo_agg_mode(preset):
    """``"seq-mean-token-mean"`` for a sapo preset (verl's ``sapo`` ignores ``loss_agg_mode``), else None."""
    row = PRESETS.get(preset)
    return "seq-mean-token-mean" if row is not None and row["stabilization"] == "sapo" else None


def verl_policy_loss(preset, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                     config=None, rollout_is_weights=None):
    """verl's ``PolicyLossFn`` for ``upg_<preset>``: ``(pg_loss, {"actor/pg_clipfrac": ..., ...})``."""
    if sapo_agg_mode(preset):
        loss_agg_mode = sapo_agg_mode(preset)   # verl's sapo ignores loss_agg_mode
    loss, out, cfg = verl_loss(preset, log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config,
                               rollout_is_weights)
    low, high = clip_range(config)
    return loss, verl_metrics(cfg, out, log_prob, old_log_prob.detach(), response_mask.to(torch.bool), low, high)


def verl_loss(preset, log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config,
              rollout_is_weights=None, *, entropy=None, ref_log_prob=None, **overrides):
    """``(loss, LossOutput, LossConfig)``: one :func:`upg_kernels.policy_loss_from_logprobs` call for
    ``upg_<preset>`` under verl's ``config``, aggregated as verl's ``agg_loss(loss_agg_mode, **global_batch_info)``.

    ``overrides`` replace fields of :func:`verl_loss_config`'s config (the engine loss sets ``entropy_coef``,
    ``kl_coef`` and ``kl_type`` here, so the entropy bonus and the KL loss share the policy term's epilogue,
    aggregation and backward)."""
    from ... import policy_loss_from_logprobs

    cfg = verl_loss_config(preset, config)
    mask = response_mask.to(torch.bool)
    info = dict(config_get(config, "global_batch_info", None) or {})
    agg, n_items, factor = verl_scale(loss_agg_mode, mask, info)
    cfg = cfg.replace(aggregation=agg, **overrides)
    old = old_log_prob.detach()
    is_ratio = None if rollout_is_weights is None else rollout_is_weights.detach().to(torch.float32)
    low, high = clip_range(config)
    if cfg.stabilization == "cispo":
        # verl's cispo weight is sg(clamp(r, 1 - low, 1 + high)); our cispo caps r at 1 + high, and the
        # floor is the detached factor max(1, (1 - low) / r) folded into the importance weight
        with torch.no_grad():
            r = torch.exp(log_prob.detach().float() - old.float())
            floor = torch.clamp((1.0 - low) / r, min=1.0)
        is_ratio = floor if is_ratio is None else is_ratio * floor
    ref = None if ref_log_prob is None else ref_log_prob.detach()
    out = policy_loss_from_logprobs(log_prob, config=cfg, entropy=entropy, loss_mask=mask, advantages=advantages,
                                    old_logprobs=old, ref_logprobs=ref, is_ratio=is_ratio,
                                    num_items_in_batch=n_items)
    return out.loss * factor, out, cfg


def verl_metrics(cfg, out, log_prob, old, mask, low, high):
    """verl's policy-loss metrics (clip fractions, approx KL) from our :class:`LossOutput`."""
    with torch.no_grad():
        m = mask.to(torch.float32)
        n = m.sum().clamp(min=1.0)

        def mean(x):
            return float((x.to(torch.float32) * m).sum() / n)

        ppo_kl = mean(old.float() - log_prob.detach().float())
        st = cfg.stabilization
        if st in ("clip", "seq_clip"):
            clipfrac = mean(out.clip_low | out.clip_high)
        elif st == "cispo":
            r = out.ratio
            clipfrac = mean((r < 1.0 - low) | (r > 1.0 + high))
        else:
            clipfrac = 0.0
        lower = mean(out.dual_clip) if st == "clip" else 0.0
    return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": lower}


def install_losses():
    """Register ``upg_<preset>`` for every preset in :data:`VERL_PRESETS` (idempotent)."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    for preset in VERL_PRESETS:
        name = f"upg_{preset}"
        if name in POLICY_LOSS_REGISTRY:
            continue

        def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
               rollout_is_weights=None, _preset=preset):
            return verl_policy_loss(_preset, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                    config, rollout_is_weights)

        fn.__name__ = f"compute_policy_loss_{name}"
        fn.__doc__ = f"upg-kernels preset {preset!r} ({PRESETS[preset]['description']}) as a verl policy loss."
        register_policy_loss(name)(fn)
