"""The fused loss path of :func:`unified_policy_loss`: Triton forward + the Triton loss epilogue.

For token-local configs (:func:`fused_supported`) with the Triton backend, ``unified_policy_loss``
computes the per-token aggregation weights ``w`` and part codes on the host from the masks, then calls
the custom op ``upg_kernels::fused_policy_epilogue`` (:mod:`upg_kernels.ops`): the forward kernel's split partials go straight
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

import torch

from ..kernels.epilogue_codes import (LIKELIHOOD_CODES, PART_DEMO_SFT, PART_DEMO_SHAPED, PART_MAIN,
                                       REFERENCE_CODES, ROLLOUT_CODES, STABILIZATION_CODES,
                                       EpilogueParams)
from .. import ops
from ..settings import FUSED_EPILOGUE
from .aggregation import part_weights


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
    return FUSED_EPILOGUE.get()


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


def fused_policy_epilogue(cfg, h2, w, b, t, kp, *, old, ref, rol, adv, isr, w_tok, code,
                          backend="triton"):
    """Run the fused op on prepared flat inputs (``prepare_inputs``'s ``h2, w, b, t`` and the
    :class:`LogprobParams` ``kp``) with ``backend``'s forward partials (a table row with
    ``fused_epilogue``; its backward serves the op's own autograd formula). Per-token inputs are
    ``[B, T]`` (or None); returns the op's ten ``[N]`` outputs."""
    def flat(x):
        return None if x is None else x.reshape(-1).to(torch.float32).contiguous()

    modes, scalars = EpilogueParams.from_config(cfg).to_lists()
    return ops.fused_policy_epilogue_op(
        h2, w, b, t, flat(old), flat(ref), flat(rol), flat(adv), flat(isr), flat(w_tok),
        code.reshape(-1).contiguous(), float(kp.temperature), int(kp.ignore_index), float(kp.softcap),
        float(kp.filter_eps), backend, modes, scalars)
