"""The fused loss path of :func:`unified_policy_loss`: Triton forward + the Triton loss epilogue.

For token-local configs (:func:`fused_supported`) with the Triton backend, ``unified_policy_loss``
computes the per-token aggregation weights ``w`` and part codes on the host from the masks, then calls
the custom op ``upg_kernels::fused_policy_epilogue``: the forward kernel's split partials go straight
into ``kernels/triton_epilogue.py``, which writes ``logp, H, lse``, the weighted per-token losses
``ell`` and the coefficients ``g_lp = dL/dlogp``, ``g_H = dL/dH`` (plus ratio / KL / IS weight / clip
flags for the metrics) in one launch. No autograd.grad over [B, T] PyTorch ops.

The loss op of :func:`unified_policy_loss` calls it in its forward and hands ``g_lp``, ``g_H`` (times
the incoming gradient) to the token_logprobs backward. The op also registers an autograd formula of
its own (``logp`` and ``H`` differentiable through the logits-recompute backward), so it is usable alone
and torch.compile traces it as one node.

``UPG_KERNELS_FUSED_EPILOGUE=0`` (or ``unified_policy_loss(..., fused_epilogue=False)``) forces the
PyTorch epilogue (the general path and the oracle).
"""
from __future__ import annotations

import math
import os

import torch

from ..kernels.epilogue_codes import (KL_CODES, LIKELIHOOD_CODES, PART_DEMO_SFT, PART_DEMO_SHAPED,
                                       PART_MAIN, REFERENCE_CODES, ROLLOUT_CODES,
                                       STABILIZATION_CODES, EpilogueParams)
from ..kernels import LogprobParams, get_backend
from ..logprobs import _check_target_range, _token_logprobs_backward_op
from .aggregation import part_weights

N_OUT = 10   # logp, ent, lse, ell, g_lp, g_H, ratio, kl, rollout_w, flags


def fused_supported(cfg) -> bool:
    """True for the token-local configs the fused epilogue covers."""
    return (cfg.ratio_level == "token"
            and cfg.stabilization in STABILIZATION_CODES
            and cfg.reference in REFERENCE_CODES
            and cfg.likelihood in LIKELIHOOD_CODES
            and cfg.rollout_is in ROLLOUT_CODES)


def fused_enabled(flag) -> bool:
    """The ``fused_epilogue`` argument (None = the ``UPG_KERNELS_FUSED_EPILOGUE`` env var, default on)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("UPG_KERNELS_FUSED_EPILOGUE", "1").strip().lower() not in ("0", "false", "no", "off")


def _params_lists(cfg):
    modes = [STABILIZATION_CODES[cfg.stabilization], REFERENCE_CODES[cfg.reference],
             LIKELIHOOD_CODES[cfg.likelihood], KL_CODES[cfg.kl_type], ROLLOUT_CODES[cfg.rollout_is],
             int(cfg.kl_bias_correction)]
    scalars = [cfg.eps_low, cfg.eps_high, cfg.delta or 0.0, cfg.dual_clip or 0.0, cfg.tau_pos,
               cfg.tau_neg, cfg.kl_coef, cfg.entropy_coef, math.log(cfg.rollout_is_cap),
               cfg.fdiv_beta, cfg.shaping_gamma, cfg.rl_coef, cfg.demo_coef]
    return [int(x) for x in modes], [float(x) for x in scalars]


def _params(modes, scalars) -> EpilogueParams:
    st, rf, lk, kt, ro, bc = modes
    (eps_low, eps_high, delta, dual, tau_pos, tau_neg, kl_coef, ent_coef, log_cap, beta, gamma,
     rl_coef, demo_coef) = scalars
    return EpilogueParams(st, rf, lk, kt, ro, bool(bc), eps_low, eps_high, delta, dual, tau_pos,
                          tau_neg, kl_coef, ent_coef, log_cap, beta, gamma, rl_coef, demo_coef)


# ----------------------------------------------------------------------------- per-token weights
def token_weights_and_codes(cfg, inp):
    """``(w [B, T] float32, code [B, T] int8)`` of the checked inputs ``inp``: aggregation weights (0
    outside the valid tokens; rl_coef / demo_coef are applied in the kernel) and part codes."""
    main_tok, demo_tok = inp.main_tok, inp.demo_tok
    w = part_weights(cfg, inp, "main")
    code = torch.where(main_tok, PART_MAIN, 0)
    if cfg.demo_part is not None:
        w = torch.where(demo_tok, part_weights(cfg, inp, "demo"), w)
        code = torch.where(demo_tok, PART_DEMO_SFT if cfg.demo_part == "sft" else PART_DEMO_SHAPED,
                           code)
    return w.contiguous(), code.to(torch.int8).contiguous()


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("upg_kernels::fused_policy_epilogue", mutates_args=())
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              targets: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
              rol: torch.Tensor | None, adv: torch.Tensor, isr: torch.Tensor | None,
              w: torch.Tensor, code: torch.Tensor, temperature: float, ignore_index: int,
              softcap: float, filter_eps: float, backend: str, modes: list[int], scalars: list[float]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton_epilogue import epilogue
    _check_target_range(targets, weight.shape[0], ignore_index)
    p = LogprobParams(temperature, ignore_index, softcap, filter_eps)
    part, rows = get_backend(backend).forward_partials(hidden, weight, bias, targets, p)
    return epilogue(part, rows, hidden.shape[0], old=old, ref=ref, rol=rol, adv=adv, isr=isr, w=w,
                    code=code, params=_params(modes, scalars))


@_fused_op.register_fake
def _(hidden, weight, bias, targets, old, ref, rol, adv, isr, w, code, temperature, ignore_index,
      softcap, filter_eps, backend, modes, scalars):
    N = hidden.shape[0]
    return (*(hidden.new_empty(N, dtype=torch.float32) for _ in range(N_OUT - 1)),
            hidden.new_empty(N, dtype=torch.int8))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    temperature, ignore_index, softcap, filter_eps, backend = inputs[11:16]
    ctx.save_for_backward(hidden, weight, bias, targets, output[2], output[1])
    ctx.args = (temperature, ignore_index, softcap, filter_eps, backend)


def _backward(ctx, g_logp, g_ent, *_rest):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    dh, dw, db = _token_logprobs_backward_op(
        hidden, weight, bias, targets, lse, ent, g_logp.float(),
        None if g_ent is None else g_ent.float(), None, *ctx.args,
        need_h, need_w, need_b and bias is not None)
    return (dh if need_h else None, dw if need_w else None,
            db if (need_b and bias is not None) else None) + (None,) * 15


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def fused_policy_epilogue(cfg, h2, w, b, t, kp, *, old, ref, rol, adv, isr, w_tok, code,
                          backend="triton"):
    """Run the fused op on prepared flat inputs (``prepare_inputs``'s ``h2, w, b, t`` and the
    :class:`LogprobParams` ``kp``) with ``backend``'s forward partials (a table row with
    ``fused_epilogue``; its backward serves the op's own autograd formula). Per-token inputs are ``[B, T]`` (or None); returns the op's ten
    ``[N]`` outputs."""
    def flat(x):
        return None if x is None else x.reshape(-1).to(torch.float32).contiguous()

    modes, scalars = _params_lists(cfg)
    return _fused_op(h2, w, b, t, flat(old), flat(ref), flat(rol), flat(adv), flat(isr),
                     flat(w_tok), code.reshape(-1).contiguous(), float(kp.temperature),
                     int(kp.ignore_index), float(kp.softcap), float(kp.filter_eps), backend, modes,
                     scalars)
