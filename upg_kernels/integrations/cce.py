"""Cut Cross-Entropy calling convention on top of :func:`upg_kernels.token_logprobs`.

``linear_cross_entropy(e, c, targets)`` computes ``F.cross_entropy(e @ c.T, targets)`` without the
logits, the way ``cut_cross_entropy.linear_cross_entropy`` (CCE 25.1.1) does, so an SFT trainer that calls
CCE can swap us in by changing the import::

    # from cut_cross_entropy import linear_cross_entropy
    from upg_kernels import linear_cross_entropy
    loss = linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=1)

Differences from CCE 25.1.1 (see docs/integrations.md):

* everything after ``targets`` is keyword-only (CCE 25.1.1 takes ``ignore_index`` as its 4th positional
  argument, later CCE releases take ``bias`` there; keywords work against both);
* ``bias`` (an lm_head bias) is accepted (CCE 25.1.1 has none);
* ``shift`` may be any integer ``k >= 0`` (``True`` = 1): embedding position ``i`` predicts target
  ``i + k`` along the second-to-last axis of ``e``; the last ``k`` positions predict nothing;
* ``filter_eps`` defaults to ``None`` (exact gradients) where CCE defaults to ``"high"`` (gradient
  filtering on); ``"auto"``/``"high"`` give CCE's value ``finfo(dtype).eps / 32``, applied like CCE's
  to ``|onehot - p|`` (relative to each row's incoming gradient; docs/kernels.md §3);
* ``impl`` is accepted and ignored (the backend is chosen by ``backend``);
* ``vocab_parallel_options`` takes our :class:`upg_kernels.VocabParallelOptions` or CCE's (same fields;
  CCE's ``reduce_e_grad`` is our ``reduce_hidden_grad``); targets are global ids, the loss is the same on
  every rank of the group, and ``reduction="mean"`` counts the (global) non-ignored targets.
"""
from __future__ import annotations

import torch

from ..logprobs import token_logprobs
from ..parallel.vocab import VocabParallelOptions

__all__ = ["linear_cross_entropy", "LinearCrossEntropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _resolve_filter_eps(filter_eps, dtype) -> float:
    if filter_eps is None:
        return 0.0
    if isinstance(filter_eps, str):
        if filter_eps in ("auto", "high"):
            # CCE's choice: 1/32 of the compute dtype's machine epsilon
            return float(torch.finfo(dtype).eps) / 32
        raise ValueError(f"filter_eps must be None, a float, 'auto' or 'high', got {filter_eps!r}")
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or filter_eps < 0:
        raise ValueError(f"filter_eps must be None, a float >= 0, 'auto' or 'high', got {filter_eps!r}")
    return float(filter_eps)


def _resolve_shift(shift) -> int:
    if isinstance(shift, bool):
        return int(shift)
    if isinstance(shift, int) and shift >= 0:
        return shift
    raise ValueError(f"shift must be a bool or an int >= 0, got {shift!r}")


def linear_cross_entropy(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         softcap: float | None = None, reduction: str = "mean", shift: bool | int = 0,
                         filter_eps: float | str | None = None, impl: object = None,
                         backend: str = "auto", vocab_parallel_options=None) -> torch.Tensor:
    """Cross-entropy of ``softcap(e @ c.T + bias)`` against ``targets``, never materializing the logits.

    Args:
        e: ``[..., D]`` embeddings (the decoder's last hidden states).
        c: ``[V, D]`` classifier (lm_head weight).
        targets: ``[...]`` integer class ids (``e``'s leading shape); ``ignore_index`` entries are skipped.
        bias: optional ``[V]`` classifier bias (an extension over CCE 25.1.1).
        ignore_index: target value that marks a position to skip.
        softcap: optional logit softcapping ``softcap * tanh(z / softcap)``.
        reduction: ``"mean"`` (over non-ignored positions; NaN when there are none, as
            ``F.cross_entropy`` and CCE give), ``"sum"`` or ``"none"``.
        shift: ``False``/``0``: ``e[..., i, :]`` is scored against ``targets[..., i]``.
            ``True``/``1`` (causal LM): against ``targets[..., i + 1]``; an integer ``k`` shifts by ``k``.
            Needs ``e.dim() >= 2``.
        filter_eps: backward tile filter (see :func:`upg_kernels.token_logprobs`); ``None`` = exact.
        impl: accepted for CCE compatibility, ignored.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`upg_kernels.token_logprobs`).
        vocab_parallel_options: ``c`` (and ``bias``) are this rank's rows ``[start, stop)`` of a
            vocabulary-parallel classifier (:class:`upg_kernels.VocabParallelOptions`, or CCE's).

    Returns:
        A float32 scalar for ``"mean"``/``"sum"``; for ``"none"`` a float32 tensor of ``targets``'s shape,
        or with ``shift=k`` of shape ``targets.shape[:-1] + (T - k,)`` (CCE's ``loss[..., k:]``
        convention), with 0 at ignored positions.
    """
    del impl
    if not isinstance(e, torch.Tensor) or not isinstance(c, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("e, c and targets must be torch.Tensors")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    k = _resolve_shift(shift)
    if e.dim() < 1:
        raise ValueError("e must have shape [..., D]")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(e.shape[:-1])} (e's leading dimensions), "
                         f"got {tuple(targets.shape)}")
    if c.dim() != 2 or c.shape[1] != e.shape[-1]:
        raise ValueError(f"c must have shape [V, D={e.shape[-1]}], got {tuple(c.shape)}")
    if k:
        if e.dim() < 2:
            raise ValueError("shift needs e with a sequence axis: shape [..., T, D]")
        T = e.shape[-2]
        kk = min(k, T)
        e = e[..., : T - kk, :]
        targets = targets[..., kk:]
    eps = _resolve_filter_eps(filter_eps, torch.promote_types(e.dtype, c.dtype))
    logp = token_logprobs(e, c, targets, bias=bias, ignore_index=ignore_index, softcap=softcap,
                          backend=backend, filter_eps=eps,
                          vocab_parallel=_vocab_options(vocab_parallel_options))
    nll = -logp  # 0 at ignored positions
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    n_valid = (targets != ignore_index).sum()
    return total / n_valid.to(total.dtype)


def _vocab_options(opts):
    """Ours as is; CCE's ``VocabParallelOptions`` (``start``, ``stop``, ``group``, ``reduce_e_grad``)
    converted once (the conversion is kept on the object, so the shard-tiling check runs once)."""
    if opts is None or isinstance(opts, VocabParallelOptions):
        return opts
    if not all(hasattr(opts, k) for k in ("start", "stop", "group")):
        raise TypeError("vocab_parallel_options must be a VocabParallelOptions (ours or CCE's: start, stop, "
                        f"group), got {type(opts).__name__}")
    mine = getattr(opts, "_upg_options", None)
    if mine is None or (mine.start, mine.stop, mine.group) != (opts.start, opts.stop, opts.group):
        mine = VocabParallelOptions(opts.start, opts.stop, opts.group,
                                    bool(getattr(opts, "reduce_e_grad", True)))
        try:
            opts._upg_options = mine
        except AttributeError:   # slotted / frozen: convert at every call
            pass
    return mine


class LinearCrossEntropy(torch.nn.Module):
    """``nn.Module`` form, mirroring ``cut_cross_entropy.LinearCrossEntropy``."""

    def __init__(self, ignore_index: int = -100, softcap: float | None = None, reduction: str = "mean",
                 filter_eps: float | str | None = None, shift: bool | int = 0, impl: object = None,
                 backend: str = "auto", vocab_parallel_options=None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.reduction = reduction
        self.filter_eps = filter_eps
        self.shift = _resolve_shift(shift)
        self.impl = impl
        self.backend = backend
        self.vocab_parallel_options = vocab_parallel_options

    def forward(self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(e, c, targets, bias=bias, ignore_index=self.ignore_index,
                                    softcap=self.softcap, reduction=self.reduction, shift=self.shift,
                                    filter_eps=self.filter_eps, backend=self.backend,
                                    vocab_parallel_options=self.vocab_parallel_options)
