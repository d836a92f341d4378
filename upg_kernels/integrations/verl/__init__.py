"""upg-kernels as a verl (0.9.1) plugin: our log-prob/entropy kernel and our losses, by configuration only.

Loaded by verl itself at ``import verl``, through the ``verl.plugins`` entry point this package declares
(pyproject.toml) or ``VERL_USE_EXTERNAL_MODULES=upg_kernels.integrations.verl``. Importing this module
when verl is installed calls :func:`install`; without verl it does nothing (and imports no verl).

What :func:`install` adds (docs/integrations.md, "verl"):

* ``actor_rollout_ref.model.use_fused_kernels=True`` with
  ``actor_rollout_ref.model.fused_kernel_options.impl_backend=upg``: the actor and reference forward
  passes compute per-token log-probs and entropy with :func:`upg_kernels.token_logprobs`
  (:mod:`.kernel`);
* ``actor_rollout_ref.actor.policy_loss.loss_mode=upg_<preset>`` for the presets of
  :data:`upg_kernels.losses.config.PRESETS` that run on per-token log-probs (:mod:`.losses`);
* ``actor_rollout_ref.actor.policy_loss.loss_mode=upg_fused_<preset>``: the engine worker's loss is
  :func:`upg_ppo_loss` (:mod:`.engine_loss`), policy loss, entropy bonus and KL loss as one fused loss
  (a drop-in for verl's ``ppo_loss``; also usable directly with ``set_loss_fn``).
"""
from __future__ import annotations

import importlib.util

from .engine_loss import FUSED_PREFIX, install_engine_loss, upg_ppo_loss
from .kernel import UPG_BACKEND, install_kernel, verl_linear_cross_entropy
from .losses import VERL_PRESETS, install_losses, verl_loss_config, verl_policy_loss

__all__ = ["install", "upg_ppo_loss", "FUSED_PREFIX", "UPG_BACKEND", "VERL_PRESETS", "verl_linear_cross_entropy",
           "verl_loss_config", "verl_policy_loss"]


def install():
    """Register the ``upg`` kernel backend, the ``upg_<preset>`` policy losses and the ``upg_fused_<preset>``
    engine loss in verl (idempotent)."""
    install_kernel()
    install_losses()
    install_engine_loss()


if importlib.util.find_spec("verl") is not None:
    install()
