"""``unified_policy_loss``: every post-training loss as one op over hidden states and the lm_head.

The vocabulary-sized work is identical for every method: per-token ``logp`` and entropy ``H`` from
the fused kernels. Everything method-specific is a cheap epilogue over ``[B, T]`` per-token scalars
(``logp``, ``H``, ``old``, ``ref``, ``rollout``, mask, advantage, demo flag) plus small per-sequence
segmented reductions (GSPO ratio, sequence IS correction, per-sequence normalization).

The loss is one autograd function (:class:`_PolicyLoss`): its forward runs the kernel forward, then the
epilogue, which yields the loss, the metrics' inputs and the exact per-token coefficients
``g_lp = dL/dlogp`` and ``g_H = dL/dH`` (the PyTorch epilogue of :mod:`.epilogue` by autograd over
detached ``[B, T]`` leaves, or the fused Triton epilogue of :mod:`.fused` in registers). Its backward
hands ``grad_output * g_lp`` and ``grad_output * g_H`` to the kernel backward (the logits-recompute
GEMMs); nothing else is differentiated. Every zero coefficient is exactly 0 (masked, clipped,
equal-reward-group tokens), so the kernel backward skips those rows exactly.

:func:`policy_loss_from_logprobs` is the same loss for callers that already hold ``[B, T]`` log-probs
(verl, any framework): one autograd function over ``logp`` (and ``H``) with the same epilogue.

Normalization of mixed batches (``is_demo``): the main rows (``is_demo`` False) and the
demonstration rows are aggregated separately, each over its own rows and tokens only::

    loss = rl_coef * L_main(main rows) + demo_coef * L_demo(demo rows)

so a mixed batch gives exactly the loss and gradients of its two parts computed separately and
added (given the same per-row advantages). Each part divides by this call's token and row counts, or,
with ``totals=`` (:func:`~upg_kernels.batch_totals`), by the whole batch's: micro-batches and ranks then
add up to the whole batch.

The per-token and per-row inputs are one :class:`~upg_kernels.LossBatch` (``batch=``, or its fields as
keyword arguments).

Flat input: ``hidden [N, H]`` with ``targets [N]`` is treated as ``N`` sequences of length 1
(``[N, 1, H]``); every per-token argument is then ``[N]`` and the per-row ones (``advantages``,
``rewards``, ``group_ids``, ``is_demo``) are ``[N]`` too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .._backend import resolve_backend
from ..kernels import LogprobParams, get_backend
from ..kernels.meta import autocast_off
from ..settings import GRAD_IN_FORWARD
from .. import ops   # the custom ops via the module (tests spy on them)
from ..kernels import one_pass, paths, select
from ..kernels.backends import with_forward
from ..kernels.one_pass import one_pass_bytes
from ..logprobs import as_number, check_ignore_index, nonfinite_rows, prepare_inputs
from .epilogue import loss_metrics, pytorch_coefficients, vespo_gamma_weight  # noqa: F401 (re-export)
from .fused import fused_enabled, fused_policy_epilogue, fused_supported, token_weights_and_codes
from .batch import LossBatch
from .inputs import LossInputs, as_config, prepare_loss_inputs


@dataclass
class LossOutput:
    """What :func:`unified_policy_loss` and :func:`policy_loss_from_logprobs` return.

    ``loss``: scalar, differentiable w.r.t. hidden / weight / bias (or the given log-probs / entropy).
    ``logprobs``, ``entropy``: detached per-token values shaped like ``targets`` (float32).
    ``metrics``: dict of python floats (see docs/losses.md, "Metrics"); with ``capturable=True``
    0-dim tensors on the loss's device (no host synchronization).
    ``coef_logp``, ``coef_entropy``: the detached gradient coefficients ``c_t = -dL/dlogp_t`` and
    ``e_t = -dL/dH_t`` shaped like ``targets`` (0 exactly where the kernel skips the row).
    ``ratio``: the per-token importance ratio the policy term used (1 where there is none);
    ``clip_low`` / ``clip_high``: bool flags of the tokens clipped below / above (``dual_clip`` the
    dual-clipped ones); ``kl``: the per-token KL estimate to the reference (0 without one). All
    detached, shaped like ``targets``; they are only meaningful where the token is in the loss.
    """
    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict = field(default_factory=dict)
    coef_logp: Optional[torch.Tensor] = None
    coef_entropy: Optional[torch.Tensor] = None
    ratio: Optional[torch.Tensor] = None
    clip_low: Optional[torch.Tensor] = None
    clip_high: Optional[torch.Tensor] = None
    dual_clip: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------- the op
@dataclass
class _Plan:
    """Everything the loss forward needs besides the differentiable tensors (read-only there: the
    forward has no side effects, so torch.compile can trace it)."""
    cfg: object
    inp: LossInputs
    kp: LogprobParams
    backend: str
    fused: bool
    grad_in_forward: object = False      # False, True (asked for) or "env" (turned on by the environment)
    workspace: int = 0
    capturable: bool = False
    bad_targets: Optional[torch.Tensor] = None   # capturable: out-of-range target ids (flat [N])

    def aux_keys(self) -> tuple:
        """The per-token auxiliaries the epilogue produces for this config (fixed order)."""
        cfg, inp = self.cfg, self.inp
        keys = ["kl"]
        if cfg.reference == "old":
            keys += ["ratio", "clip_low", "clip_high", "dual"]
        if cfg.rollout_is is not None and inp.rol is not None:
            keys.append("rollout_w")
        if cfg.stabilization == "vespo" and cfg.reference == "old":
            keys.append("vespo_phi")
        return tuple(keys)


# outputs of the loss functions after ``total``: detached [B, T] values, then the aux in aux_keys order
_SIDE = ("logp", "ent", "ent_d", "g_lp", "g_H", "L_main", "L_demo")


def _kernel_forward(plan: _Plan, h2, w, b, t):
    """``(logp, ent, lse)`` ``[N]`` from the log-prob kernels (no autograd)."""
    kp = plan.kp
    if h2.shape[0] == 0:
        z = h2.new_zeros(0, dtype=plan.inp.cd)
        return z, z, z
    out = ops.token_logprobs_op(h2, w, b, t, kp.temperature, kp.ignore_index, kp.softcap,
                                kp.filter_eps, plan.backend, plan.capturable)
    if plan.bad_targets is not None:   # capturable: bad ids reported on the device (NaN rows)
        out = tuple(ops.poison(x, plan.bad_targets) for x in out)
    return out


def _fused_forward(plan: _Plan, h2, w, b, t):
    """Triton forward + the fused epilogue kernel (token-local configs; losses/fused.py)."""
    cfg, inp = plan.cfg, plan.inp
    B, T = inp.B, inp.T
    w_tok, code = token_weights_and_codes(cfg, inp)
    outs = fused_policy_epilogue(cfg, h2, w, b, t, plan.kp, old=inp.old, ref=inp.ref, rol=inp.rol,
                                 adv=inp.adv, isr=inp.isr, w_tok=w_tok, code=code,
                                 backend=plan.backend)
    logp, ent, lse, ell, g_lp, g_H, ratio, kl, rollw, flags = (x.reshape(B, T) for x in outs)
    zero = torch.zeros_like(ell)
    L_main = torch.where(inp.main_tok, ell, zero).sum()
    L_demo = torch.where(inp.demo_tok, ell, zero).sum()
    total = cfg.rl_coef * L_main + cfg.demo_coef * L_demo
    aux = {"kl": kl, "ratio": ratio, "clip_low": (flags & 1) != 0, "clip_high": (flags & 2) != 0,
           "dual": (flags & 4) != 0, "rollout_w": rollw}
    ent_d = torch.where(inp.valid, ent, torch.zeros_like(ent))
    return total, (logp, ent, ent_d, g_lp, g_H, L_main, L_demo), aux, lse.reshape(-1)


def _outputs(ctx, plan, total, side, aux):
    """``(loss, *side outputs)`` of a loss function's forward: the ``_SIDE`` values, then the aux of
    ``plan.aux_keys()``, as fresh tensors (no aliasing of saved ones) marked non-differentiable."""
    outs = (total.clone(),) + tuple(x.detach().clone()
                                    for x in tuple(side) + tuple(aux[k] for k in plan.aux_keys()))
    ctx.mark_non_differentiable(*outs[1:])
    return outs


class _PolicyLoss(torch.autograd.Function):
    """loss = epilogue(kernel_forward(hidden, weight, bias)); backward = kernel backward with the
    per-token coefficients times ``grad_output``. Returns ``(loss, *side outputs)``: the detached
    per-token values of ``_SIDE`` and the auxiliaries of ``plan.aux_keys()``."""

    @staticmethod
    def forward(ctx, h2, w, b, t, plan: _Plan):
        ctx.grads = None
        if plan.grad_in_forward:
            out = _PolicyLoss._forward_with_grads(ctx, h2, w, b, t, plan)
            if out is not None:
                return out
        if plan.fused:
            total, side, aux, lse = _fused_forward(plan, h2, w, b, t)
        else:
            logp, ent, lse = _kernel_forward(plan, h2, w, b, t)
            B, T = plan.inp.B, plan.inp.T
            logp_bt, ent_bt = logp.reshape(B, T), ent.reshape(B, T)
            inp = plan.inp.to_dtype(logp.dtype)   # autocast: follow the kernel's dtype
            total, parts, aux, g_lp, g_H, ent_d = pytorch_coefficients(plan.cfg, inp, logp_bt, ent_bt)
            side = (logp_bt, ent_bt, ent_d, g_lp, g_H, *parts)
        g_lp, g_H = side[3], side[4]
        ctx.save_for_backward(h2, w, b, t, lse, side[1].reshape(-1), g_lp.reshape(-1), g_H.reshape(-1))
        ctx.plan = plan
        ctx.use_ent = plan.cfg.entropy_coef != 0     # H enters the loss only through the bonus
        return _outputs(ctx, plan, total, side, aux)

    @staticmethod
    def _forward_with_grads(ctx, h2, w, b, t, plan: _Plan):
        """``grad_in_forward``: the one-pass path (kernels/one_pass.py) computes values and
        gradients; the backward scales them by ``grad_output``. Token-local configs chunk any rows;
        the others whole sequences. None when an environment-enabled run cannot chunk whole
        sequences (the caller then runs the two-pass path)."""
        from ..kernels.one_pass import SequenceTooLong, forward_with_grads
        cfg, B, T = plan.cfg, plan.inp.B, plan.inp.T

        def coef_fn(logp, ent, done):   # the rows of ``done`` (whole sequences) are final
            inp = plan.inp.to_dtype(logp.dtype)
            out = pytorch_coefficients(cfg, inp, logp.reshape(B, T), ent.reshape(B, T))
            return out[3].reshape(-1), out[4].reshape(-1)

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        triton_rows = get_backend(plan.backend).triton and h2.dtype != torch.float64
        try:
            logp, ent, _lse, dh, dw, db = forward_with_grads(
                h2, w, b, t, plan.kp, coef_fn, budget=plan.workspace,
                rows_impl="triton" if triton_rows else "torch", hint=_coefficient_hint(plan, h2),
                seq_len=None if fused_supported(cfg) else T, need_hidden=need_h,
                need_weight=need_w, need_bias=need_b and b is not None)
        except SequenceTooLong:
            if plan.grad_in_forward == "env":
                return None
            raise
        logp_bt, ent_bt = logp.reshape(B, T), ent.reshape(B, T)
        inp = plan.inp.to_dtype(logp.dtype)
        total, parts, aux, g_lp, g_H, ent_d = pytorch_coefficients(cfg, inp, logp_bt, ent_bt)
        side = (logp_bt, ent_bt, ent_d, g_lp, g_H, *parts)
        ctx.grads = (dh, dw, db)
        ctx.grad_dtypes = (h2.dtype, w.dtype, None if b is None else b.dtype)
        return _outputs(ctx, plan, total, side, aux)

    @staticmethod
    def backward(ctx, grad, *_side_grads):
        if ctx.grads is not None:   # computed in the forward: scale by grad_output (and cast once)
            return _PolicyLoss._scaled_grads(ctx, grad)
        h2, w, b, t, lse, ent, g_lp, g_H = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b is not None
        if h2.shape[0] == 0 or not (need_h or need_w or need_b):
            return (torch.zeros_like(h2) if need_h else None,
                    torch.zeros_like(w) if need_w else None,
                    torch.zeros_like(b) if need_b else None, None, None)
        grad = grad.to(torch.float32 if lse.dtype != torch.float64 else lse.dtype)
        g_logp = (grad * g_lp).to(lse.dtype)
        g_ent = (grad * g_H).to(lse.dtype) if ctx.use_ent else None
        kp = ctx.plan.kp
        dh, dw, db = ops.token_logprobs_backward_op(
            h2, w, b, t, lse, ent, g_logp, g_ent, None, kp.temperature, kp.ignore_index, kp.softcap,
            kp.filter_eps, ctx.plan.backend, need_h, need_w, need_b, ctx.plan.capturable)
        return (dh if need_h else None, dw if need_w else None, db if need_b else None, None, None)

    @staticmethod
    def _scaled_grads(ctx, grad):
        """The one-pass gradients times ``grad_output``: in place where a gradient is already in its
        dtype (float32 weights: the float32 dW is the gradient, no second [V, H] buffer), else cast
        into a new tensor (the float32 accumulator of bf16/fp16 weights: one rounding). ctx lets go
        of them first, so autograd takes them over without a copy; a second backward
        (``retain_graph=True``) is refused."""
        if ctx.grads == "spent":
            raise RuntimeError("the one-pass path (path='one_pass' / grad_in_forward) hands its "
                               "gradients to the first backward; a second backward (retain_graph) "
                               "is not supported: use path='two_pass'")
        grads, ctx.grads = ctx.grads, "spent"
        out = []
        for x, dt in zip(grads, ctx.grad_dtypes):
            if x is None:
                out.append(None)
            elif isinstance(x, one_pass.PairGrad):          # compensated dW: (hi + lo) * grad
                out.append(x.finish(grad))
            elif x.dtype == dt:
                out.append(x.mul_(grad.to(x.dtype)))
            else:
                out.append(torch.mul(x, grad.to(x.dtype),
                                     out=torch.empty(x.shape, dtype=dt, device=x.device)))
        del grads, x
        return tuple(out) + (None, None)


class _PolicyLossFromLogprobs(torch.autograd.Function):
    """The same epilogue over given ``[B, T]`` log-probs / entropy."""

    @staticmethod
    def forward(ctx, logp_bt, ent_bt, plan: _Plan):
        inp = plan.inp.to_dtype(logp_bt.dtype)
        ent_in = ent_bt if ent_bt is not None else torch.zeros_like(logp_bt)
        total, parts, aux, g_lp, g_H, ent_d = pytorch_coefficients(plan.cfg, inp, logp_bt, ent_in)
        ctx.save_for_backward(g_lp, g_H)
        ctx.has_ent = ent_bt is not None
        side = (logp_bt, ent_in, ent_d, g_lp, g_H, *parts)
        return _outputs(ctx, plan, total, side, aux)

    @staticmethod
    def backward(ctx, grad, *_side_grads):
        g_lp, g_H = ctx.saved_tensors
        return (grad * g_lp, grad * g_H if ctx.has_ent else None, None)


# --------------------------------------------------------------------------------------------- public
def unified_policy_loss(hidden, weight, targets, *, config, batch: Optional[LossBatch] = None,
                        bias=None, temperature=1.0, backend="auto", ignore_index=-100, softcap=None,
                        filter_eps=0.0, fused_epilogue=None, grad_in_forward=None,
                        vocab_parallel=None, cp_group=None, capturable=False, path=None,
                        **batch_fields) -> LossOutput:
    """The loss of ``config`` (a :class:`LossConfig` or a preset name) from hidden states and the lm_head.

    Args:
        hidden: ``[B, T, H]`` (or flat ``[N, H]`` = N sequences of length 1) last hidden states.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` (``[N]``) token ids; ``ignore_index`` positions are masked.
        config: the loss (see :class:`LossConfig`).
        batch: the per-token and per-row inputs, a :class:`LossBatch` (``loss_mask``, ``advantages``,
            ``rewards`` with ``group_size``/``group_ids``, ``old_logprobs``, ``ref_logprobs``,
            ``rollout_logprobs``, ``is_demo``, ``is_ratio``, ``num_items_in_batch``, ``totals``; see its
            docstring). ``**batch_fields``: the same fields as keyword arguments (shorthand).
            With rewards, **compute advantages before splitting**: each call must hold whole groups.
        temperature: divides the logits. ``backend``: ``"auto"`` or a backend name
            (:data:`upg_kernels.kernels.BACKEND_NAMES`, the backend table).
        ignore_index, softcap, filter_eps: passed to :func:`upg_kernels.token_logprobs` (target id
            that masks a position; Gemma-2 final-logit softcap; backward tile filter, 0 = exact).
        fused_epilogue: with a Triton backend and a token-local config, run the loss epilogue
            inside a Triton kernel (docs/losses.md "Fused epilogue"). ``None`` (default): on unless
            ``UPG_KERNELS_FUSED_EPILOGUE=0``; ``False`` forces the PyTorch epilogue.
        grad_in_forward: run the one-pass path (docs/kernels.md section 1c): the gradients in the
            forward pass (one logits pass, 6NHV instead of 8NHV flops; the backward scales them by
            ``grad_output``), in float32 chunks of rows x the vocabulary; one budget,
            ``UPG_KERNELS_ONE_PASS_BYTES`` (default 3 GiB; 128 MiB off CUDA), holds the chunks and
            the float32 dW accumulator of bf16/fp16 weights (too small: a ValueError naming it;
            ``UPG_KERNELS_ONE_PASS_DW`` picks a smaller dW state). Sequence-level configs chunk
            whole sequences (a longer sequence is a ValueError). ``None``: ``UPG_KERNELS_GRAD_IN_FORWARD=1`` turns it on (default off; then
            a sequence that does not fit runs the two-pass path). The older spelling of
            ``path="one_pass"`` (``True``) / ``path="two_pass"`` (``False``).
        path: ``None`` (chosen: pinned by ``UPG_KERNELS_PATH`` / ``UPG_KERNELS_DETERMINISTIC``,
            else selected, docs/kernels.md "Path selection"), ``"two_pass"``,
            ``"two_pass_gemm_forward"`` (Triton backends) or ``"one_pass"`` (the names of
            :data:`upg_kernels.kernels.paths.PATH_NAMES`).
        vocab_parallel: a :class:`upg_kernels.VocabParallelOptions`: ``weight``/``bias`` hold rows
            ``[start, stop)`` of a vocabulary-parallel head (tensor parallelism); ``targets`` stay global
            ids. The log-probs and entropy of the full vocabulary come from one all-gather of ``[3, N]``
            per call (:func:`upg_kernels.parallel.vocab_parallel_logprobs`); the loss, identical on every
            rank of the group, goes through the PyTorch epilogue (the fused epilogue and
            ``grad_in_forward`` are refused under it). Every backend and preset works.
        cp_group: context parallelism: the process group whose ranks hold the other tokens of the same
            rows (every rank the same rows, its own positions). The sequence-level reductions (per-row
            and token_mean counts, GSPO/LUSPO ratios, VESPO's sum, sequence-level IS, demo counts) and the
            metrics are completed over it; each rank's ``loss`` is its part, and the sum over the group
            of the losses and gradients equals the unsplit call (docs/distributed.md). With
            ``totals``, count them with ``batch_totals(..., cp_group=cp_group)`` (each row once).
        capturable: no host synchronization in the forward and backward (CUDA graphs): every row
            runs, the metrics are device tensors, a target id outside ``[0, V)`` makes its row's
            log-prob NaN (so the loss is NaN) instead of raising, the PyTorch epilogue is used, and
            the input checks that read values are skipped (docs/kernels.md section 2c).
            Not with ``grad_in_forward``; rewards need ``group_size``.

    Returns:
        :class:`LossOutput`.
    """
    cfg = as_config(config)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if hidden.dim() == 3:
        flat = False
        B, T = hidden.shape[0], hidden.shape[1]
    elif hidden.dim() == 2:
        flat = True
        B, T = hidden.shape[0], 1
    else:
        raise ValueError(f"hidden must have shape [B, T, H] or [N, H], got {list(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {list(hidden.shape[:-1])} (hidden's leading "
                         f"dimensions), got {list(targets.shape)}")

    # the epilogue's dtype: what the kernels return (float64 for float64 inputs, else float32)
    w_dt = weight.dtype if isinstance(weight, torch.Tensor) else hidden.dtype
    cd = torch.float64 if torch.promote_types(hidden.dtype, w_dt) == torch.float64 else torch.float32
    lb = LossBatch.of(batch, batch_fields, "unified_policy_loss")
    check_ignore_index(ignore_index)
    temperature, filter_eps = as_number("temperature", temperature), as_number("filter_eps", filter_eps)
    softcap = None if softcap is None else as_number("softcap", softcap)
    inp = prepare_loss_inputs(cfg, B, T, flat, targets.reshape(B, T) != ignore_index, cd, lb,
                              cp_group=cp_group, capturable=bool(capturable))

    if vocab_parallel is not None:
        if capturable:
            raise ValueError("capturable=True is not supported with vocab_parallel (its all-gather "
                             "path compacts rows on the host)")
        return _vocab_parallel_loss(cfg, inp, hidden, weight, targets, bias, vocab_parallel,
                                    temperature=temperature, ignore_index=ignore_index, backend=backend,
                                    softcap=softcap, filter_eps=filter_eps, fused_epilogue=fused_epilogue,
                                    grad_in_forward=grad_in_forward or paths.check_path(path) == paths.ONE_PASS)
    h2, w, b, t = prepare_inputs(hidden, weight, targets, bias, temperature, softcap, filter_eps,
                                 ignore_index)
    bad = None
    if capturable and t.numel():
        t, bad = ops.device_target_check(t, w.shape[0], int(ignore_index))
    name = resolve_backend(backend, hidden.device, h2.dtype)
    kp = LogprobParams(float(temperature), int(ignore_index), float(softcap or 0.0), float(filter_eps))
    use_fused = (cd == torch.float32 and fused_enabled(fused_epilogue) and fused_supported(cfg)
                 and get_backend(name).fused_epilogue and h2.shape[0] > 0 and not capturable)
    chosen, gif, tile = _choose_path(path, grad_in_forward, cfg, name, h2, w, b, t, kp, T,
                               cp_group is not None, bool(capturable),
                               lambda: _coefficient_hint(_Plan(cfg, inp, kp, name, False), h2))
    use_fused = use_fused and chosen == paths.TWO_PASS
    spec = with_forward(name, paths.PATHS[chosen].forward, tile)
    plan = _Plan(cfg, inp, kp, spec, use_fused, gif, one_pass_bytes(h2.device) if gif else 0,
                 capturable=bool(capturable), bad_targets=bad)
    with autocast_off(hidden.device.type):
        outs = _PolicyLoss.apply(h2, w, b, t, plan)
    return _output(outs, plan, tuple(targets.shape))


def _choose_path(path, grad_in_forward, cfg, backend, h2, w, b, t, kp, T, cp, capturable, hint):
    """``(path name, grad_in_forward, dz tile)`` of a call (the tile: the selection's choice for the
    GEMM backward's dz kernel, None for the default): ``grad_in_forward`` True (asked for: a sequence
    that does not fit is an error), ``"env"`` (pinned by the environment or selected: such a call
    runs the two-pass path) or False. ``grad_in_forward=True/False`` is ``path="one_pass"`` /
    ``"two_pass"``; ``UPG_KERNELS_GRAD_IN_FORWARD=1`` is ``UPG_KERNELS_PATH=one_pass``. Under
    context parallelism (``cp``) the one-pass path is refused when asked for and never chosen: its
    chunks would run the sequence reductions' collectives a rank-dependent number of times."""
    paths.check_path(path)
    if capturable and (grad_in_forward or path == paths.ONE_PASS):
        raise ValueError("capturable=True does not support grad_in_forward / path='one_pass' (the "
                         "one-pass path compacts rows on the host)")
    if cp and (grad_in_forward or path == paths.ONE_PASS):
        raise ValueError("grad_in_forward=True is not supported with cp_group, nor path='one_pass' (the "
                         "one-pass chunks would run the sequence reductions' collectives a "
                         "rank-dependent number of times); pass None/False or another path")
    if grad_in_forward is not None:
        if path is not None and (path == paths.ONE_PASS) != bool(grad_in_forward):
            raise ValueError(f"grad_in_forward={grad_in_forward!r} contradicts path={path!r} "
                             "(grad_in_forward=True is path='one_pass'); pass one of them")
        if grad_in_forward:
            return paths.ONE_PASS, True, None
        path = path or paths.TWO_PASS
    if path is None and GRAD_IN_FORWARD.get():
        path = paths.ONE_PASS
        explicit = False
    else:
        explicit = path is not None
    grads = "".join(c for c, x in zip("hwb", (h2, w, b))
                    if torch.is_grad_enabled() and x is not None and x.requires_grad)
    gpu = h2.device.type == "cuda"
    torch_rows = not (get_backend(backend).triton and h2.dtype != torch.float64)

    def one_pass_ok(M):
        if cp or capturable:
            return False
        try:
            pl = one_pass.plan(M, h2.shape[1], w.shape[0], h2.dtype, one_pass_bytes(h2.device),
                               torch_rows=torch_rows, softcap=bool(kp.softcap), gpu=gpu,
                               need_hidden="h" in grads, need_weight="w" in grads,
                               w_dtype=w.dtype)
        except ValueError:
            return False
        return fused_supported(cfg) or pl.max_rows >= T

    chosen, tile = select.resolve(path, backend=backend, hidden=h2, weight=w, bias=b, targets=t,
                                  p=kp, loss=True, grads=grads, entropy=cfg.entropy_coef != 0,
                                  one_pass_ok=one_pass_ok, hint=hint,
                                  budget=one_pass_bytes(h2.device), no_sync=capturable)
    if chosen != paths.ONE_PASS:
        return chosen, False, tile
    return chosen, True if explicit and path == paths.ONE_PASS else "env", None


def _vocab_parallel_loss(cfg, inp, hidden, weight, targets, bias, opts, *, fused_epilogue,
                         grad_in_forward, **kw) -> LossOutput:
    """The loss over a vocabulary-parallel head: the full-vocabulary ``logp`` / ``H`` (differentiable,
    one all-gather) into the PyTorch epilogue of :class:`_PolicyLossFromLogprobs`."""
    from ..parallel.vocab import vocab_parallel_logprobs
    if fused_epilogue:
        raise ValueError("fused_epilogue=True is not supported with vocab_parallel (the fused Triton "
                         "epilogue needs the whole vocabulary in one kernel); pass fused_epilogue=None/False")
    if grad_in_forward:
        raise ValueError("grad_in_forward=True is not supported with vocab_parallel (the one-pass "
                         "gradients need the global log-sum-exp before the pass); pass None/False")
    logp, ent, _ = vocab_parallel_logprobs(hidden, weight, targets, opts, bias=bias, **kw)
    B, T = inp.B, inp.T
    if cfg.entropy_coef == 0:
        ent = ent.detach()          # H enters the loss only through the bonus: no entropy backward
    plan = _Plan(cfg, inp, LogprobParams(), "torch", False)
    outs = _PolicyLossFromLogprobs.apply(logp.reshape(B, T).to(inp.cd), ent.reshape(B, T).to(inp.cd), plan)
    return _output(outs, plan, tuple(targets.shape))


def _coefficient_hint(plan: _Plan, h2):
    """``[N]`` bool: rows whose coefficients are non-zero at a probe point (log-probs at the
    sampler's, ratio 1, entropy 1). It only orders the one-pass path's rows (zero-coefficient rows
    last, where the chunks skip them); the result never depends on it."""
    cd = torch.float64 if h2.dtype == torch.float64 else torch.float32
    inp = plan.inp.to_dtype(cd)
    zero = torch.zeros(inp.B, inp.T, dtype=cd, device=h2.device)
    probe = zero if inp.old is None else torch.where(inp.main_tok, inp.old, zero)
    out = pytorch_coefficients(plan.cfg, inp, probe, torch.ones_like(probe))
    return ((out[3] != 0) | (out[4] != 0)).reshape(-1)


def policy_loss_from_logprobs(logprobs, *, config, entropy=None, batch: Optional[LossBatch] = None,
                              cp_group=None, capturable=False, **batch_fields) -> LossOutput:
    """The loss of ``config`` from per-token log-probs that the caller already has.

    The same presets, batch fields (a :class:`LossBatch` as ``batch=`` or its fields as keyword
    arguments; see :func:`unified_policy_loss`), validation, metrics and
    :class:`LossOutput` as the hidden-state entry, for frameworks that compute ``logprobs`` (and
    ``entropy``) themselves. ``logprobs``: ``[B, T]`` (or flat ``[N]``) float log-probs of the
    taken tokens; ``entropy``: optional ``[B, T]`` per-token entropy (needed when the config has
    ``entropy_coef > 0``). The loss is differentiable w.r.t. both; positions outside ``loss_mask``
    get exactly zero gradient, and a NaN there cannot reach the loss. ``cp_group``: context
    parallelism, as in :func:`unified_policy_loss`. ``capturable=True``: no host
    synchronization (metrics as device tensors; see :func:`unified_policy_loss`).
    """
    cfg = as_config(config)
    if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
        raise TypeError("logprobs must be a floating torch.Tensor of per-token log-probs, got "
                        f"{type(logprobs).__name__ if not isinstance(logprobs, torch.Tensor) else logprobs.dtype}")
    if logprobs.dim() == 2:
        flat, (B, T) = False, logprobs.shape
    elif logprobs.dim() == 1:
        flat, B, T = True, logprobs.shape[0], 1
    else:
        raise ValueError(f"logprobs must have shape [B, T] or [N], got {list(logprobs.shape)}")
    if entropy is not None:
        if not isinstance(entropy, torch.Tensor) or not entropy.dtype.is_floating_point:
            raise TypeError("entropy must be a floating torch.Tensor or None")
        if entropy.shape != logprobs.shape:
            raise ValueError(f"entropy must have logprobs' shape {list(logprobs.shape)}, got "
                             f"{list(entropy.shape)}")
    elif cfg.entropy_coef != 0:
        raise ValueError(f"config.entropy_coef={cfg.entropy_coef} needs the per-token entropy "
                         "(pass entropy=...)")
    cd = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    valid = torch.ones(B, T, dtype=torch.bool, device=logprobs.device)
    inp = prepare_loss_inputs(cfg, B, T, flat, valid, cd,
                              LossBatch.of(batch, batch_fields, "policy_loss_from_logprobs"),
                              cp_group=cp_group, capturable=bool(capturable))
    plan = _Plan(cfg, inp, LogprobParams(), "torch", False, capturable=bool(capturable))
    lp = logprobs.reshape(B, T).to(cd)
    ent = None if entropy is None else entropy.reshape(B, T).to(cd)
    outs = _PolicyLossFromLogprobs.apply(lp, ent, plan)
    return _output(outs, plan, tuple(logprobs.shape))


def _output(outs, plan: _Plan, shape) -> LossOutput:
    loss, rest = outs[0], outs[1:]
    side = dict(zip(_SIDE, rest[:len(_SIDE)]))
    bad = None if plan.capturable else nonfinite_rows(plan.inp.valid, side["logp"], side["ent"])
    if bad:
        raise FloatingPointError(
            f"non-finite log-probs / entropy at rows {bad} of the batch, at tokens in the loss (NaN/inf in "
            "those rows' hidden states or in the given log-probs, or in weight/bias): the loss would be "
            "NaN, and dW / db, which sum over every row, would be NaN too. The other rows' values are "
            "unaffected; exclude the bad rows with loss_mask (a masked row cannot reach the loss or any "
            "gradient) or find the source")
    aux = dict(zip(plan.aux_keys(), rest[len(_SIDE):]))
    inp = plan.inp.to_dtype(side["logp"].dtype)
    parts = (side["L_main"], side["L_demo"])
    metrics = loss_metrics(plan.cfg, inp, aux, parts, side["ent_d"], side["g_lp"], side["g_H"],
                           plan.capturable)
    zero_b = torch.zeros_like(inp.valid)
    logp = side["logp"]

    def shaped(x):
        return x.detach().reshape(shape)

    return LossOutput(
        loss=loss, logprobs=shaped(logp), entropy=shaped(side["ent"]), metrics=metrics,
        coef_logp=shaped(-side["g_lp"]), coef_entropy=shaped(-side["g_H"]),
        ratio=shaped(aux.get("ratio", torch.ones_like(logp))),
        clip_low=shaped(aux.get("clip_low", zero_b)), clip_high=shaped(aux.get("clip_high", zero_b)),
        dual_clip=shaped(aux.get("dual", zero_b)),
        kl=shaped(aux["kl"] if inp.have_ref else torch.zeros_like(logp)))
