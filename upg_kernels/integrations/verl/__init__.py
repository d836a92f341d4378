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
* :func:`fused_ppo_loss` (:mod:`.engine_loss`): policy loss, entropy bonus and KL loss as one engine loss
  function, for ``engine.set_loss_fn``.
"""
from __future__ import annotations

import importlib.util

from .kernel import UPG_BACKEND, install_kernel, verl_linear_cross_entropy
from .losses import VERL_PRESETS, install_losses, verl_loss_config, verl_policy_loss

__all__ = ["install", "UPG_BACKEND", "VERL_PRESETS", "verl_linear_cross_entropy", "verl_loss_config",
           "verl_policy_loss"]


def install():
    """Register the ``upg`` kernel backend and the ``upg_<preset>`` policy losses in verl (idempotent)."""
    install_kernel()
    install_losses()


if importlib.util.find_spec("verl") is not None:
    install()
