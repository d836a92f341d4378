"""The library's custom ops (namespace ``upg_kernels``), public, in one module.

- :func:`token_logprobs_op` (``upg_kernels::token_logprobs``): ``(logp, entropy, lse)`` of flat
  prepared inputs by a backend of the table (:mod:`upg_kernels.kernels.backends`), with an autograd
  formula that calls
- :func:`token_logprobs_backward_op` (``upg_kernels::token_logprobs_backward``): the backend's
  logits-recompute backward.
- :func:`fused_policy_epilogue_op` (``upg_kernels::fused_policy_epilogue``): a backend's forward
  partials + the fused loss epilogue kernel (losses/fused.py builds its arguments), with an autograd
  formula through ``logp`` and entropy.
- :func:`check_target_range`: the target-id check the ops run on real data;
  :func:`device_target_check` / :func:`poison`: capturable mode's check on the device.

Each has a fake (meta) implementation, so ``torch.compile`` traces every entry as one node; the
public functions (``token_logprobs``, ``unified_policy_loss``) validate, flatten and call these.
Callers use them through this module (``ops.token_logprobs_op(...)``): tests replace them here.
"""
from __future__ import annotations

import torch

from .kernels import LogprobParams, get_backend
from .kernels.backends import dz_tile_of, split_backend
from .kernels.epilogue_codes import EpilogueParams

N_EPILOGUE_OUT = 10   # fused_policy_epilogue_op: logp, ent, lse, ell, g_lp, g_H, ratio, kl, rollout_w, flags


def check_target_range(flat_targets, V, ignore_index):
    """ValueError naming the first target id outside ``[0, V)`` that is not ``ignore_index``."""
    if flat_targets.numel() == 0 or flat_targets.device.type == "meta":   # meta: no values to check
        return
    valid = flat_targets != ignore_index
    bad = valid & ((flat_targets < 0) | (flat_targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets holds id {int(flat_targets[i])} at flat position {i}, outside "
                         f"[0, V={V}) and not ignore_index={ignore_index}")


def device_target_check(flat_targets, V, ignore_index):
    """Capturable mode's target-range check, on the device (no host synchronization):
    ``(safe_targets, bad)`` where ``bad`` flags ids outside ``[0, V)`` that are not ``ignore_index`` and
    ``safe_targets`` has them replaced by ``ignore_index`` (the kernels never see them). The caller
    reports them with :func:`poison`: NaN log-prob, entropy and lse at those rows, so the loss becomes
    NaN instead of silently wrong (docs/kernels.md section 2c)."""
    bad = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= V))
    return torch.where(bad, torch.full_like(flat_targets, ignore_index), flat_targets), bad


def poison(x, bad):
    """``x`` with NaN where ``bad`` (differentiable: ``where``)."""
    return torch.where(bad, torch.full_like(x, float("nan")), x)


def _none_to_empty(x, like):
    # custom ops cannot return None: hand back (distinct) empty tensors for what was not asked for
    return x if x is not None else like.new_empty(0)


# ----------------------------------------------------------------------------- token_logprobs
@torch.library.custom_op("upg_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, temperature: float, ignore_index: int,
                      softcap: float, filter_eps: float, backend: str, capturable: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # checked here, on real data, so that torch.compile traces the caller without a data-dependent
    # branch; capturable: the caller has mapped bad ids to ignore_index (device_target_check)
    if not capturable:
        check_target_range(targets, weight.shape[0], ignore_index)
    p = LogprobParams(temperature, ignore_index, softcap, filter_eps, capturable)
    be, fwd = split_backend(backend)   # "name" or "name:forward" (the path two_pass_gemm_forward)
    return be.forward(hidden, weight, bias, targets, p, path=fwd)


@token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, softcap, filter_eps, backend,
      capturable=False):
    N = hidden.shape[0]
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return tuple(hidden.new_empty(N, dtype=dt) for _ in range(3))


@torch.library.custom_op("upg_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                               g_logp: torch.Tensor, g_ent: torch.Tensor | None,
                               g_lse: torch.Tensor | None, temperature: float,
                               ignore_index: int, softcap: float,
                               filter_eps: float, backend: str, need_hidden: bool,
                               need_weight: bool, need_bias: bool, capturable: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = LogprobParams(temperature, ignore_index, softcap, filter_eps, capturable)
    tile = dz_tile_of(backend)     # the dz tile the path selection chose ("name@tile")
    if tile is None:
        dh, dw, db = get_backend(backend).backward(
            hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
            need_hidden, need_weight, need_bias and bias is not None, g_lse=g_lse)
    else:
        from .kernels.triton_dz import dz_tile_scope
        with dz_tile_scope(tile):
            dh, dw, db = get_backend(backend).backward(
                hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
                need_hidden, need_weight, need_bias and bias is not None, g_lse=g_lse)
    return _none_to_empty(dh, hidden), _none_to_empty(dw, hidden), _none_to_empty(db, hidden)


@token_logprobs_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, g_lse, temperature, ignore_index,
      softcap, filter_eps, backend, need_hidden, need_weight, need_bias, capturable=False):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0))


def _logprobs_backward(saved, needs_input_grad, args, g_logp, g_ent, g_lse, capturable=False):
    """The three input gradients (None where not needed) of ``(hidden, weight, bias)`` through
    :func:`token_logprobs_backward_op`; ``args`` = (temperature, ignore_index, softcap, filter_eps,
    backend). Shared by both ops' autograd formulas."""
    hidden, weight, bias, targets, lse, ent = saved
    need_h, need_w, need_b = needs_input_grad[:3]
    need_b = need_b and bias is not None
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    dh, dw, db = token_logprobs_backward_op(
        hidden, weight, bias, targets, lse, ent, g_logp.to(lse.dtype),
        None if g_ent is None else g_ent.to(lse.dtype),
        None if g_lse is None else g_lse.to(lse.dtype), *args, need_h, need_w, need_b, capturable)
    return dh if need_h else None, dw if need_w else None, db if need_b else None


def _tlp_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, softcap, filter_eps, backend, *cap = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.args = (temperature, ignore_index, softcap, filter_eps, backend)
    ctx.capturable = bool(cap and cap[0])


def _tlp_backward(ctx, g_logp, g_ent, g_lse):
    grads = _logprobs_backward(ctx.saved_tensors, ctx.needs_input_grad, ctx.args, g_logp, g_ent, g_lse,
                               ctx.capturable)
    return grads + (None,) * 7


token_logprobs_op.register_autograd(_tlp_backward, setup_context=_tlp_setup_context)


# ----------------------------------------------------------------------------- fused epilogue
@torch.library.custom_op("upg_kernels::fused_policy_epilogue", mutates_args=())
def fused_policy_epilogue_op(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        targets: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
        rol: torch.Tensor | None, adv: torch.Tensor, isr: torch.Tensor | None,
        w: torch.Tensor, code: torch.Tensor, temperature: float, ignore_index: int,
        softcap: float, filter_eps: float, backend: str, modes: list[int], scalars: list[float]
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backend``'s forward partials, then the fused epilogue kernel with the parameters
    ``EpilogueParams.from_lists(modes, scalars)``: the ten ``[N]`` outputs of
    ``kernels/triton_epilogue.py:epilogue``."""
    from .kernels.triton_epilogue import epilogue
    check_target_range(targets, weight.shape[0], ignore_index)
    p = LogprobParams(temperature, ignore_index, softcap, filter_eps)
    part, rows = get_backend(backend).forward_partials(hidden, weight, bias, targets, p)
    return epilogue(part, rows, hidden.shape[0], old=old, ref=ref, rol=rol, adv=adv, isr=isr, w=w,
                    code=code, params=EpilogueParams.from_lists(modes, scalars))


@fused_policy_epilogue_op.register_fake
def _(hidden, weight, bias, targets, old, ref, rol, adv, isr, w, code, temperature, ignore_index,
      softcap, filter_eps, backend, modes, scalars):
    N = hidden.shape[0]
    return (*(hidden.new_empty(N, dtype=torch.float32) for _ in range(N_EPILOGUE_OUT - 1)),
            hidden.new_empty(N, dtype=torch.int8))


def _fused_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    ctx.save_for_backward(hidden, weight, bias, targets, output[2], output[1])
    ctx.args = tuple(inputs[11:16])       # temperature, ignore_index, softcap, filter_eps, backend


def _fused_backward(ctx, g_logp, g_ent, *_rest):
    grads = _logprobs_backward(ctx.saved_tensors, ctx.needs_input_grad, ctx.args, g_logp, g_ent, None)
    return grads + (None,) * 15


fused_policy_epilogue_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)
