"""``token_logprobs``: per-token log-probs (and entropy) straight from hidden states and the lm_head.

The public function validates its inputs, flattens them and calls the custom op
``upg_kernels::token_logprobs`` (:mod:`upg_kernels.ops`), whose autograd formula calls
``upg_kernels::token_logprobs_backward``. Both dispatch to a backend of the table in
:mod:`upg_kernels.kernels.backends` (Triton or chunked PyTorch); neither ever holds an N x V logits
tensor.
"""
from __future__ import annotations

import math
import operator
import warnings

import torch

from . import ops
from ._backend import resolve_backend
from .kernels.meta import autocast_enabled, autocast_off
from .kernels.workspace import keeps_weight

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- validation
def check_inputs(hidden, weight, targets, bias, temperature, softcap, filter_eps, ignore_index=-100):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating tensor (fp32, bf16, fp16, fp64), got {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating tensor (fp32, bf16, fp16, fp64), got {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must hold integer token ids, got {targets.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, H={H}] to match hidden [..., {H}], "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dimensions), got {tuple(targets.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
    temperature = as_number("temperature", temperature)
    if not (_is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    softcap = None if softcap is None else as_number("softcap", softcap)
    if softcap is not None and not (_is_number(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    filter_eps = as_number("filter_eps", filter_eps)
    if not (_is_number(filter_eps) and filter_eps >= 0):
        raise ValueError(f"filter_eps must be a finite number >= 0, got {filter_eps!r}")
    check_ignore_index(ignore_index)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def as_number(name, x):
    """A python number from ``x``: numbers pass; a 0-d tensor (not requiring grad) or a numpy scalar is
    read as its value (one device sync for a GPU tensor); anything else is a ``TypeError`` naming
    ``name``."""
    if isinstance(x, (int, float)):   # bool included: the range checks name it
        return x
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be a number or a 0-d real tensor, got a tensor of shape "
                            f"{list(x.shape)} and dtype {x.dtype}")
        if x.requires_grad:
            raise TypeError(f"{name} is a tensor that requires grad; it is a hyper-parameter, not "
                            "differentiable: pass a float (or x.detach())")
        if x.device.type == "meta":
            raise TypeError(f"{name} is a meta tensor (no value); pass a float")
        return x.item()
    try:
        import numpy as np
    except ImportError:   # numpy is a dependency, but the check must not need it
        np = None
    if np is not None and isinstance(x, (np.generic, np.ndarray)) and np.ndim(x) == 0 \
            and np.issubdtype(np.asarray(x).dtype, np.number) and not np.issubdtype(np.asarray(x).dtype, np.bool_):
        return np.asarray(x).item()
    raise TypeError(f"{name} must be a number (or a 0-d tensor / numpy scalar), got {type(x).__name__}")


def nonfinite_rows(valid, *values, limit: int = 8) -> list:
    """The first ``limit`` row indices (leading dimension) where a ``valid`` position of one of ``values``
    is NaN / inf: one elementwise pass and one device sync; [] on ``meta`` and while torch.compile traces."""
    if valid.device.type == "meta" or valid.numel() == 0 or torch.compiler.is_compiling():
        return []
    bad = torch.zeros_like(valid)
    for v in values:
        bad |= ~torch.isfinite(v)
    bad &= valid
    if not bool(bad.any()):
        return []
    rows = bad.reshape(bad.shape[0], -1).any(-1) if bad.dim() > 1 else bad
    return rows.nonzero().flatten()[:limit].tolist()


def check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as an int (``TypeError`` otherwise: None is not "no position ignored"; pass an id
    no target uses, e.g. -100, and mask with ``loss_mask``)."""
    if isinstance(ignore_index, bool) or ignore_index is None:
        ok = False
    else:
        try:
            ignore_index = operator.index(ignore_index)
            ok = True
        except TypeError:
            ok = False
    if not ok:
        raise TypeError(f"ignore_index must be an int (a target id no token uses, e.g. -100; mask positions "
                        f"with loss_mask), got {ignore_index!r}")
    return ignore_index


def _common_dtype(hidden, weight, bias):
    """The compute dtype: autocast's when it is on for this device, else the promoted input dtype."""
    dev = hidden.device.type
    if autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def prepare_inputs(hidden, weight, targets, bias, temperature, softcap, filter_eps, ignore_index=-100):
    """Validate, then flatten to ``[N, H]`` / ``[N]`` and cast to the compute dtype (autocast's, else the
    promoted one), contiguous: ``(hidden2d, weight, bias, targets int64)``. Shared by every op entry.

    The compute dtype is ``hidden2d``'s. A float32 weight under a bf16/fp16 compute dtype (autocast) is
    NOT cast here: it goes on as it is and the backends cast it slab by slab (kernels/workspace.py,
    :class:`~upg_kernels.kernels.workspace.WeightSlabs`), so no ``[V, H]`` copy exists and its gradient
    comes out in float32. The bias (``V`` elements) is cast whole."""
    check_inputs(hidden, weight, targets, bias, temperature, softcap, filter_eps, ignore_index)
    dt = _common_dtype(hidden, weight, bias)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2 = (h2 if h2.dtype == dt else h2.to(dt)).contiguous()
    w = (weight if weight.dtype == dt or keeps_weight(weight.dtype, dt) else weight.to(dt)).contiguous()
    b = None if bias is None else (bias if bias.dtype == dt else bias.to(dt)).contiguous()
    t = targets.reshape(-1)
    t = (t if t.dtype == torch.int64 else t.long()).contiguous()
    return h2, w, b, t


# ----------------------------------------------------------------------------- public API
def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, return_lse=False, backend="auto", softcap=None,
                   filter_eps=0.0, vocab_parallel=None, capturable=False, path=None):
    """Per-token log-probs of ``targets`` under ``softmax(softcap(hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 hidden states (the decoder's last layer).
        weight: ``[V, H]`` lm_head weight.
        targets: ``[...]`` integer token ids (``hidden``'s leading shape); ``ignore_index`` rows are skipped.
        bias: optional ``[V]`` lm_head bias.
        temperature: positive float dividing the logits (the sampler's temperature); a 0-d tensor or
            numpy scalar is read as its value.
        ignore_index: target id that marks a row to skip (its outputs are 0, its gradient 0).
        return_entropy: also return the per-token entropy of the distribution.
        return_lse: also return the per-token log-sum-exp of the (scaled) logits, ``lse = log sum_j
            exp(z_j)`` (the state value ``V(s)`` when the logits are read as an implicit ``Q(s, a)``);
            differentiable (``d lse / dz = p``). 0 at ignored rows.
        backend: ``"auto"`` (``"triton"`` on CUDA, chunked PyTorch elsewhere; ``UPG_KERNELS_BACKEND``
            overrides), ``"triton"`` (Triton forward, GEMM backward), ``"triton_atomic"`` (the same
            forward, the atomic single-kernel backward) or ``"torch"``.
        softcap: optional final-logit softcapping ``c * tanh(z / c)`` (Gemma-2 style), applied
            before the temperature.
        filter_eps: backward tile filter (Triton backend): skip logit tiles whose every element has
            ``|dz| <= filter_eps * (|g_logp| + |g_ent|) / temperature`` of its row, i.e. CCE's
            ``|onehot - p| <= filter_eps`` (docs/kernels.md has the error bound). 0 = exact.
        capturable: no host synchronization in the forward and backward (CUDA graphs,
            ``torch.compile(mode="reduce-overhead")``): every row runs (no compaction of ignored or
            zero-gradient rows), and a target id outside ``[0, V)`` gives NaN outputs at its row
            instead of a ``ValueError`` (docs/kernels.md section 2c).
        vocab_parallel: a :class:`upg_kernels.VocabParallelOptions` for a vocabulary-parallel
            (tensor-parallel) head: ``weight``/``bias`` then hold rows ``[start, stop)`` of the head,
            ``targets`` stay global ids, and the outputs are those of the full vocabulary (one
            all-gather of ``[3, N]`` per call; docs/distributed.md).
        path: ``None`` (pinned by ``UPG_KERNELS_PATH`` / ``UPG_KERNELS_DETERMINISTIC``, else
            selected: docs/kernels.md "Path selection"), ``"two_pass"`` or
            ``"two_pass_gemm_forward"`` (Triton backends). There is no ``"one_pass"`` here: without
            a loss there are no coefficients to apply in the forward.

    Returns:
        ``logp`` float32 ``[...]``; with ``return_entropy`` and/or ``return_lse`` a tuple
        ``(logp, entropy)``, ``(logp, lse)`` or ``(logp, entropy, lse)``. Differentiable with respect
        to ``hidden``, ``weight`` and ``bias`` through every output.
    """
    check_ignore_index(ignore_index)
    temperature, filter_eps = as_number("temperature", temperature), as_number("filter_eps", filter_eps)
    softcap = None if softcap is None else as_number("softcap", softcap)
    if vocab_parallel is not None:
        if capturable:
            raise ValueError("capturable=True is not supported with vocab_parallel")
        from .parallel.vocab import vocab_parallel_logprobs
        logp, ent, lse = vocab_parallel_logprobs(
            hidden, weight, targets, vocab_parallel, bias=bias, temperature=temperature,
            ignore_index=ignore_index, backend=backend, softcap=softcap, filter_eps=filter_eps)
        extra = ((ent,) if return_entropy else ()) + ((lse,) if return_lse else ())
        return (logp, *extra) if extra else logp
    h2, w, b, t = prepare_inputs(hidden, weight, targets, bias, temperature, softcap, filter_eps,
                                 ignore_index)
    capturable = bool(capturable)
    bad = None
    if capturable and t.numel():
        t, bad = ops.device_target_check(t, w.shape[0], int(ignore_index))
    lead = tuple(hidden.shape[:-1])
    name = resolve_backend(backend, hidden.device, h2.dtype)
    name = _with_path(path, name, h2, w, b, t, float(temperature), int(ignore_index),
                      float(softcap or 0.0), float(filter_eps), return_entropy, capturable)
    if h2.shape[0] == 0:
        out_dt = torch.float64 if h2.dtype == torch.float64 else torch.float32
        logp = (h2.sum(-1) * 0).to(out_dt).reshape(lead)  # keeps the graph for empty inputs
        ent = lse = logp.clone()
    else:
        with autocast_off(hidden.device.type):
            logp, ent, lse = ops.token_logprobs_op(
                h2, w, b, t, float(temperature), int(ignore_index), float(softcap or 0.0),
                float(filter_eps), name, capturable)
        if bad is not None:
            logp, ent, lse = (ops.poison(x, bad) for x in (logp, ent, lse))
        logp, ent, lse = logp.reshape(lead), ent.reshape(lead), lse.reshape(lead)
        rows = None if capturable else nonfinite_rows(targets != ignore_index, logp.detach(), ent.detach(),
                                                       lse.detach())
        if rows:
            warnings.warn(f"token_logprobs: non-finite log-probs / entropy at rows {rows} (of targets' "
                          "leading dimension; NaN/inf in those rows' hidden states, or in weight/bias). "
                          "The other rows' outputs and hidden-state gradients are unaffected, but dW and db "
                          "sum over every row and absorb them: exclude those rows (ignore_index) or find the "
                          "source", RuntimeWarning, stacklevel=2)
    extra = ((ent,) if return_entropy else ()) + ((lse,) if return_lse else ())
    return (logp, *extra) if extra else logp


def _with_path(path, name, h2, w, b, t, temperature, ignore_index, softcap, filter_eps, entropy,
               capturable=False):
    """The backend string of the call's path (kernels/paths.py, kernels/select.py)."""
    from .kernels import paths, select
    from .kernels.backends import with_forward
    from .kernels.contract import LogprobParams
    paths.check_path(path)
    grads = "".join(c for c, x in zip("hwb", (h2, w, b))
                    if torch.is_grad_enabled() and x is not None and x.requires_grad)
    chosen, tile = select.resolve(path, backend=name, hidden=h2, weight=w, bias=b, targets=t,
                                  p=LogprobParams(temperature, ignore_index, softcap, filter_eps),
                                  loss=False, grads=grads, entropy=entropy, no_sync=capturable)
    return with_forward(name, paths.PATHS[chosen].forward, tile)
