"""Vocabulary-parallel (tensor-parallel) lm_heads: each rank of a group holds rows ``[start, stop)`` of W.

No new kernel: every rank runs the public :func:`upg_kernels.token_logprobs` (``return_entropy=True,
return_lse=True``) on its shard, then ONE collective (an all-gather of a ``[3, N]`` tensor per rank: the
shard's ``lse_r``, the target logit ``z_t`` on the shard that owns the target (0 elsewhere) and
``lse_r - H_r``) gives every rank the exact global values::

    lse = logsumexp_r lse_r,   w_r = exp(lse_r - lse),   logp = z_t - lse,
    H   = lse - sum_r w_r (lse_r - H_r)

(``H_r`` is the entropy of the softmax restricted to shard r; ``w_r`` the probability mass of shard r).
The backward is local per shard, into the existing kernel backward (which takes ``g_lse``)::

    g_logp_r = G_lp * owner_r,   g_ent_r = G_H * w_r,
    g_lse_r  = G_lp (owner_r - w_r) + G_H w_r (H_r - lse_r - H + lse) + G_lse w_r

``dW`` and ``db`` stay local (each rank owns its rows); ``dh`` is all-reduced over the group, or returned
partial with ``reduce_hidden_grad=False`` for callers that reduce it themselves (Megatron's
column-parallel lm_head reduces the input gradient in its own ``copy_to_tensor_model_parallel_region``).
Every rank computes the same (replicated) outputs, so a loss computed from them is the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .comm import check_group


def _even_split(n: int, rank: int, world: int) -> tuple[int, int]:
    start = rank * (n // world) + min(rank, n % world)
    return start, start + n // world + (1 if rank < n % world else 0)


@dataclass
class VocabParallelOptions:
    """This rank's shard of a vocabulary-parallel lm_head (Cut Cross-Entropy's name and fields).

    ``start``, ``stop``: the rows ``[start, stop)`` of the full ``[V, H]`` head that this rank's ``weight``
    (and ``bias``) hold; the shards of the ranks of ``group`` must tile ``[0, V)`` (checked once, with one
    all-gather, on first use). ``group``: the tensor-parallel process group (``None``: the default group).
    ``reduce_hidden_grad``: all-reduce the hidden-state gradient over ``group`` in the backward (default);
    ``False`` returns this shard's partial ``dh`` (the caller sums it, as Megatron's column-parallel head
    does). CCE calls this flag ``reduce_e_grad``.
    """
    start: int
    stop: int
    group: object = None
    reduce_hidden_grad: bool = True
    _vocab: int | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def for_vocab(cls, vocab_size: int, group=None, *, reduce_hidden_grad: bool = True
                  ) -> "VocabParallelOptions":
        """Split ``vocab_size`` rows as evenly as possible over the ranks of ``group`` (in rank order;
        the first ``V % world`` ranks get one row more), as Megatron's and CCE's vocab-parallel heads do."""
        import torch.distributed as dist
        if not (isinstance(vocab_size, int) and vocab_size > 0):
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        check_group(group, "group")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("VocabParallelOptions.for_vocab needs an initialized torch.distributed "
                             "process group")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if vocab_size < world:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the group's {world} ranks")
        start, stop = _even_split(vocab_size, rank, world)
        return cls(start, stop, group, reduce_hidden_grad)

    from_vocab = for_vocab   # CCE's name

    @property
    def local_size(self) -> int:
        return self.stop - self.start

    def vocab_size(self, device) -> int:
        """The global V, after checking (once: one all-gather of ``(start, stop)``) that the shards of
        the group tile ``[0, V)`` in rank order."""
        if self._vocab is None:
            import torch.distributed as dist
            world = dist.get_world_size(self.group)
            mine = torch.tensor([self.start, self.stop], dtype=torch.int64, device=device)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine, group=self.group)
            spans = [tuple(int(v) for v in p.tolist()) for p in parts]
            expect = 0
            for r, (a, b) in enumerate(spans):
                if a != expect or b <= a:
                    raise ValueError(
                        f"vocab_parallel: the shards of the group do not tile the vocabulary [0, V) in rank "
                        f"order: rank {r} holds [{a}, {b}) where [{expect}, ...) with stop > start was "
                        f"expected (all shards: {spans})")
                expect = b
            self._vocab = expect
        return self._vocab


def check_options(options, weight, bias) -> VocabParallelOptions:
    """Validate ``options`` against this rank's ``weight`` / ``bias`` shard; returns it."""
    if not isinstance(options, VocabParallelOptions):
        raise TypeError("vocab_parallel must be an upg_kernels.VocabParallelOptions, got "
                        f"{type(options).__name__}")
    check_group(options.group, "vocab_parallel.group")
    import torch.distributed as dist
    if options.group is None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel needs an initialized torch.distributed process group")
    if not (isinstance(options.start, int) and isinstance(options.stop, int)
            and 0 <= options.start < options.stop):
        raise ValueError(f"vocab_parallel: need 0 <= start < stop, got start={options.start!r}, "
                         f"stop={options.stop!r}")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] != options.local_size:
        raise ValueError(f"vocab_parallel: weight must hold this rank's rows [start={options.start}, "
                         f"stop={options.stop}) of the head, i.e. shape [{options.local_size}, H], got "
                         f"{list(weight.shape)}")
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (options.local_size,):
        raise ValueError(f"vocab_parallel: bias must hold this rank's rows, shape [{options.local_size}], "
                         f"got {list(bias.shape)}")
    return options


class _VocabParallelLogprobs(torch.autograd.Function):
    """``(logp, H, lse)`` ``[N]`` of the full vocabulary from this rank's shard (see the module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: VocabParallelOptions, kw: dict):
        import torch.distributed as dist
        from ..logprobs import token_logprobs
        ctx.set_materialize_grads(False)
        t = targets.reshape(-1)
        t = t if t.dtype == torch.int64 else t.long()
        ignore = kw["ignore_index"]
        valid = t != ignore
        owner = valid & (t >= opts.start) & (t < opts.stop)
        # the shard's local ids: the owner's target, any valid id elsewhere (its logp_r is unused);
        # -1 (never a local id) marks the globally ignored rows
        local = torch.where(owner, t - opts.start, torch.where(valid, torch.zeros_like(t), -torch.ones_like(t)))
        need = ctx.needs_input_grad[:3]
        leaves = [None if x is None else x.detach().requires_grad_(bool(n))
                  for x, n in zip((hidden, weight, bias), need)]
        with torch.enable_grad():
            lp_r, ent_r, lse_r = token_logprobs(
                leaves[0], leaves[1], local.reshape(targets.shape), bias=leaves[2], ignore_index=-1,
                return_entropy=True, return_lse=True, temperature=kw["temperature"], softcap=kw["softcap"],
                backend=kw["backend"], filter_eps=kw["filter_eps"])
            lp_r, ent_r, lse_r = lp_r.reshape(-1), ent_r.reshape(-1), lse_r.reshape(-1)
        zero = torch.zeros((), dtype=lse_r.dtype, device=lse_r.device)
        mine = torch.stack([lse_r.detach(), torch.where(owner, lp_r.detach() + lse_r.detach(), zero),
                            lse_r.detach() - ent_r.detach()])
        world = dist.get_world_size(opts.group)
        allst = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(allst, mine.contiguous(), group=opts.group)   # the one collective: [3, N] per rank
        st = torch.stack(allst)                                       # [R, 3, N]
        L = st[:, 0]
        lse = torch.logsumexp(L, dim=0)
        w = torch.exp(L - lse)
        logp = st[:, 1].sum(0) - lse
        ent = lse - (w * st[:, 2]).sum(0)
        logp, ent, lse = (torch.where(valid, x, zero) for x in (logp, ent, lse))
        w_r = torch.where(valid, w[dist.get_rank(opts.group)], zero)
        ctx.graph = (leaves, lp_r, ent_r, lse_r)
        ctx.save_for_backward(owner, w_r, lse, ent, lse_r.detach(), ent_r.detach())
        ctx.opts = opts
        shape = targets.shape
        return logp.reshape(shape), ent.reshape(shape), lse.reshape(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse):
        owner, w_r, lse, ent, lse_r, ent_r = ctx.saved_tensors
        if ctx.graph is None:
            raise RuntimeError("vocab_parallel: the backward of this call already ran (the shard's graph is "
                               "freed after one backward; retain_graph does not keep it)")
        leaves, lp_r, ent_r_g, lse_r_g = ctx.graph
        ctx.graph = None
        dt = lse.dtype
        f = owner.to(dt)
        outs, grads = [], []
        G = None if g_logp is None else g_logp.reshape(-1).to(dt)
        g_lse_r = torch.zeros_like(lse)
        if G is not None:
            outs.append(lp_r)
            grads.append(G * f)
            g_lse_r = g_lse_r + G * (f - w_r)
        if g_ent is not None:
            GH = g_ent.reshape(-1).to(dt)
            outs.append(ent_r_g)
            grads.append(GH * w_r)
            g_lse_r = g_lse_r + GH * w_r * (ent_r - lse_r - ent + lse)
        if g_lse is not None:
            g_lse_r = g_lse_r + g_lse.reshape(-1).to(dt) * w_r
        outs.append(lse_r_g)
        grads.append(g_lse_r)
        want = [x for x, n in zip(leaves, ctx.needs_input_grad[:3]) if x is not None and n]
        got = iter(torch.autograd.grad(outs, want, grads, allow_unused=True) if want else ())
        res = [next(got) if (x is not None and n) else None for x, n in zip(leaves, ctx.needs_input_grad[:3])]
        if res[0] is not None and ctx.opts.reduce_hidden_grad:
            import torch.distributed as dist
            res[0] = res[0].contiguous()
            dist.all_reduce(res[0], group=ctx.opts.group)
        return res[0], res[1], res[2], None, None, None


def vocab_parallel_logprobs(hidden, weight, targets, options: VocabParallelOptions, *, bias=None,
                            temperature=1.0, ignore_index=-100, backend="auto", softcap=None,
                            filter_eps=0.0):
    """``(logp, entropy, lse)`` shaped like ``targets``, over the FULL vocabulary, from this rank's shard.

    ``weight [stop - start, H]`` (and ``bias``) hold rows ``[start, stop)`` of the head; ``targets`` are
    global ids, checked against the global V. Every rank of ``options.group`` must call this with the same
    ``hidden`` and ``targets``; all return the same values. Differentiable w.r.t. ``hidden`` (all-reduced
    unless ``options.reduce_hidden_grad`` is False), ``weight`` and ``bias`` (local shards).
    """
    from ..logprobs import check_inputs
    from ..ops import check_target_range
    check_options(options, weight, bias)
    check_inputs(hidden, weight, targets, bias, temperature, softcap, filter_eps)
    V = options.vocab_size(weight.device)
    t = targets.reshape(-1)
    check_target_range(t if t.dtype == torch.int64 else t.long(), V, ignore_index)
    kw = dict(temperature=float(temperature), ignore_index=int(ignore_index), softcap=softcap,
              backend=backend, filter_eps=float(filter_eps))
    return _VocabParallelLogprobs.apply(hidden, weight, bias, targets, options, kw)
