"""The one-pass path (``unified_policy_loss(..., grad_in_forward=True)``, path name ``"one_pass"``):
loss values and gradients in one pass over the logits, 6·N·H·V flops instead of 8·N·H·V.

The two-pass path computes the logits twice (forward, then recomputed in the backward). When the
loss's per-token coefficients ``g_lp = dL/dlogp``, ``g_H = dL/dH`` of a chunk of rows are known as soon
as the chunk's log-probs and entropies are -- every token-local loss, and every sequence-level one
(GSPO, sequence IS, VESPO) once the chunk holds whole sequences -- one pass does everything::

    for each chunk c of rows (C rows; the whole vocabulary):
        h_c = hidden[rows of c]                      gather, [C, H]
        z   = h_c @ W^T                              cuBLAS, float32 [C, V] in the workspace
        lse, H, logp = stats(z)                      row kernel 1: reads z once
        g_lp, g_H    = coef_fn(...) at the rows      the loss epilogue on [rows] tensors (O(C))
        dz  = dz(z, coefficients)                    row kernel 2: reads z once, writes dz in place
                                                     (the GEMM operand dtype), zero-coefficient rows 0
        dh[rows] = dz @ W ;  dW_acc += dz^T h_c ;  db += 1^T dz          cuBLAS GEMMs

The backward only scales the stored ``dh, dW, db`` by ``grad_output``. On CUDA (and under the
Triton interpreter) the two row steps are the kernels of ``triton_onepass.py``; elsewhere (the CPU)
they are :class:`TorchRows`, a few torch passes over the chunk.

**Rows.** Ignored rows (``targets == ignore_index``) are never computed. The caller may pass a
``hint`` (rows whose coefficients are probably non-zero; it only orders the work, never changes the
result): hinted rows go first, so the rows whose coefficients come out all zero collect at the end of
the chunks, and each chunk runs dz and the gradient GEMMs only on its prefix up to its last row with a
non-zero coefficient. A zero-coefficient row inside that prefix gets an exact zero dz row and a
zeroed hidden row in the GEMMs (a NaN hidden state there cannot reach dW).

**Sequences.** ``seq_len=T`` (configs whose coefficients need a whole sequence) packs whole
sequences (``T`` consecutive rows) into the chunks; a sequence with more non-ignored tokens than a
chunk holds is refused (:class:`SequenceTooLong`), naming the budget.

**Memory** (:func:`plan`, the one owner). One budget, ``UPG_KERNELS_ONE_PASS_BYTES`` (default 3 GiB
on CUDA, :data:`ONE_PASS_BYTES`; 128 MiB elsewhere; :func:`set_one_pass_bytes`), holds everything the
path allocates beyond its outputs: the dW state (bf16 / fp16 weights: the float32 accumulator,
``4·V·H`` bytes, in the default ``fp32`` mode), the weight cast slab (autocast, below) and the chunk
workspace (float32 logits ``4·V`` bytes a row, 8 for float64, the gathered hidden rows and the dh
staging rows) in what is left. dW is rounded once (the backward scales and casts the accumulator).
``UPG_KERNELS_ONE_PASS_DW=compensated`` keeps the gradient itself plus a bf16 remainder (``2·V·H``
bytes and a float32 product slab; as exact as the float32 accumulator, more traffic per chunk);
``per_chunk`` accumulates bf16 / fp16 dW in the gradient itself (no extra memory; one rounding per
chunk, an error that grows with the chunk count). float32 / float64 weights always accumulate in
their gradient (no extra buffer). A float32 weight with bf16 / fp16 hidden states (autocast) is never
cast whole: the logits and dh GEMMs take it slab by slab, cast into one buffer of at most
``UPG_KERNELS_CAST_SLAB_BYTES`` (``workspace.WeightSlabs``, counted in the budget), dh then sums the
slabs in a float32 ``[C, H]`` buffer, and dW accumulates in the float32 gradient. Chunks are
balanced (``ceil(M / ceil(M / C_max))`` rows, a multiple of 16). On CUDA a budget that leaves chunks
of fewer than :data:`MIN_CHUNK_ROWS` rows is refused with a ``ValueError`` naming the variables (a
slow crawl otherwise: each chunk re-reads and re-writes the whole dW).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import settings
from .contract import LogprobParams
from .gemm import mm_acc, mm_f32
from .meta import any_true, is_meta, nonzero_rows
from .torch_chunked import logits_grad_, scale_logits_
from .workspace import WeightSlabs, cast_rows, cast_slab_bytes, keeps_weight

ONE_PASS_BYTES = settings.ONE_PASS_BYTES.default   # 3 GiB: llama3-8b: 1.96 GiB dW acc. + 2048-row chunks
ONE_PASS_CPU_BYTES = 128 * 2**20   # off CUDA: ~500 rows at V = 32768, a fraction of eager's N x V logits
MIN_CHUNK_ROWS = 256            # CUDA: smaller chunks make the per-chunk dW update memory-bound
DW_MODES = settings.ONE_PASS_DW.choices            # "fp32", "compensated", "per_chunk"
NARROW = (torch.bfloat16, torch.float16)
PAIR_SLAB_ROWS = 4096           # compensated dW: vocabulary rows of dW per float32 product slab
_override = None


def set_one_pass_bytes(n: int | None) -> None:
    """Set the one-pass budget in bytes, chunks + dW accumulator (None: back to the environment /
    default)."""
    global _override
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ValueError(f"one-pass workspace bytes must be a positive int or None, got {n!r}")
    _override = n


def one_pass_bytes(device: torch.device | None = None) -> int:
    """The budget (chunks + dW accumulator): :func:`set_one_pass_bytes`, else
    ``UPG_KERNELS_ONE_PASS_BYTES``, else 3 GiB (:data:`ONE_PASS_BYTES`), or :data:`ONE_PASS_CPU_BYTES`
    (128 MiB) for a ``device`` that is not CUDA / meta (a CPU's GEMMs are as fast on ~500-row
    chunks, and memory is the point)."""
    if _override is not None:
        return _override
    if not settings.ONE_PASS_BYTES.is_set() and device is not None and device.type not in ("cuda", "meta"):
        return ONE_PASS_CPU_BYTES
    return settings.ONE_PASS_BYTES.get()


class SequenceTooLong(ValueError):
    """A sequence-level config's sequence does not fit one chunk of the one-pass workspace."""


@dataclass(frozen=True)
class OnePassPlan:
    chunk_rows: int        # rows per chunk (balanced)
    max_rows: int          # rows the budget allows in one chunk (whole-sequence packing)
    n_chunks: int
    dw_fp32: bool          # dW accumulates in a float32 [V, H] buffer (bf16/fp16 grads, mode fp32)
    chunk_bytes: int       # the chunk workspace (logits, gathered hidden, dh staging)
    acc_bytes: int         # the dW state beside the gradient (acc_bytes(); 0 without one)
    budget: int            # the budget both come out of
    dw_mode: str = "fp32"  # DW_MODES: how bf16/fp16 dW accumulates
    dw_roundings: int = 1  # roundings of dW to its dtype (per_chunk: one per chunk)
    cast_bytes: int = 0    # the weight slab cast buffer (autocast: float32 weight, bf16/fp16 compute)

    @property
    def dw_pair(self) -> bool:
        """dW is the gradient plus a bf16 remainder (mode ``compensated``)."""
        return self.acc_bytes > 0 and self.dw_mode == "compensated"

    @property
    def total_bytes(self) -> int:
        """What the path holds beyond its outputs: the chunk workspace, the dW state, the cast slab."""
        return self.chunk_bytes + self.acc_bytes + self.cast_bytes


def dw_mode() -> str:
    """``UPG_KERNELS_ONE_PASS_DW`` (``fp32`` unless set)."""
    return settings.ONE_PASS_DW.get()


def plan_key(device: torch.device | None = None) -> str:
    """The part of a path-selection key that the one-pass plan's settings make: its budget and dW mode
    (another budget or mode gives other chunks, hence another time)."""
    return f"|op{one_pass_bytes(device)}-{dw_mode()}"


def row_bytes(V: int, H: int, dtype: torch.dtype, *, torch_rows: bool, softcap: bool = False,
              need_hidden: bool = True, cast: bool = False) -> int:
    """Workspace bytes per chunk row: the float32 (float64) logits row, the gathered hidden row and
    the dh staging row; the PyTorch row steps also hold ``exp(z - m)`` (and tanh with a softcap);
    ``cast`` (the weight cast slab by slab): the float32 dh row that sums the slabs."""
    ce = 8 if dtype == torch.float64 else 4
    e = torch.empty((), dtype=dtype).element_size()
    per = ce * V + e * H + (e * H if need_hidden else 0) + (4 * H if need_hidden and cast else 0)
    if torch_rows:                                # exp(z - m), tanh, a 2-byte dz copy
        per += ce * V * (2 if softcap else 1) + (e * V if e < ce else 0)
    return per


def acc_bytes(V: int, H: int, grad_dtype: torch.dtype, mode: str, need_weight: bool = True) -> int:
    """Bytes of the dW state beside the gradient, for a bf16/fp16 gradient: ``4·V·H`` (the float32
    accumulator) in mode ``fp32``; ``2·V·H`` (the bf16 remainder ``lo``) plus a float32 product slab
    of ``PAIR_SLAB_ROWS x H`` in mode ``compensated``; else 0 (float32/float64 gradients accumulate
    in themselves, ``per_chunk`` in the gradient)."""
    if not (need_weight and grad_dtype in NARROW):
        return 0
    if mode == "fp32":
        return 4 * V * H
    if mode == "compensated":
        return 2 * V * H + 4 * min(V, PAIR_SLAB_ROWS) * H
    return 0


def plan(M: int, H: int, V: int, dtype: torch.dtype, budget: int | None = None, *,
         need_hidden: bool = True, need_weight: bool = True, torch_rows: bool = False,
         softcap: bool = False, gpu: bool = False, w_dtype: torch.dtype | None = None,
         mode: str | None = None) -> OnePassPlan:
    """The memory plan of ``M`` rows within ``budget`` bytes (default :func:`one_pass_bytes`): the dW
    state first (:func:`acc_bytes` of ``w_dtype``, the weight's and its gradient's dtype, default
    ``dtype``, and ``mode``, default :func:`dw_mode`), the weight cast slab (a float32 weight with
    bf16/fp16 ``dtype`` is cast slab by slab), then balanced chunks in the rest. ``gpu``: the CUDA
    rules (refuse chunks under :data:`MIN_CHUNK_ROWS` rows)."""
    budget = one_pass_bytes() if budget is None else budget
    mode = dw_mode() if mode is None else mode
    if mode not in DW_MODES:
        raise ValueError(f"the one-pass dW mode must be one of {DW_MODES}, got {mode!r}")
    w_dtype = dtype if w_dtype is None else w_dtype
    grad_dtype = w_dtype
    acc = acc_bytes(V, H, grad_dtype, mode, need_weight)
    cast = keeps_weight(w_dtype, dtype)
    cast_b = cast_slab_bytes(H, dtype, min(V, cast_rows(H, dtype))) if cast else 0
    per = row_bytes(V, H, dtype, torch_rows=torch_rows, softcap=softcap, need_hidden=need_hidden,
                    cast=cast)
    cmax = max(budget - acc - cast_b, 0) // per
    need = max(1, min(M, MIN_CHUNK_ROWS) if gpu else 1)
    if cmax >= 16 and cmax // 16 * 16 >= need:   # a call of `need` rows that fits runs in one chunk
        cmax = cmax // 16 * 16
    if cmax < need:
        what = (f"a float32 dW accumulator of {acc} bytes (4·V·H) plus " if mode == "fp32" and acc else
                f"a compensated dW remainder of {acc} bytes (2·V·H + a float32 slab) plus " if acc else "")
        alt = (f"; or set {settings.ONE_PASS_DW.name}=compensated (about half the dW memory) or "
               f"{settings.ONE_PASS_DW.name}=per_chunk (none; dW rounded to "
               f"{str(grad_dtype).replace('torch.', '')} once per chunk)"
               if mode == "fp32" and acc else
               f"; or set {settings.ONE_PASS_DW.name}=per_chunk (no dW state; dW rounded to "
               f"{str(grad_dtype).replace('torch.', '')} once per chunk)" if acc else "")
        raise ValueError(
            f"the one-pass path needs {acc + cast_b + need * per} bytes at V={V}, H={H}: {what}"
            f"{f'a weight cast slab of {cast_b} bytes plus ' if cast_b else ''}chunks of at "
            f"least {need} rows of {per} bytes ({'smaller chunks are slow' if need > 1 else 'one row'}), "
            f"but {settings.ONE_PASS_BYTES.name} (or set_one_pass_bytes) grants {budget}: raise it "
            f"(default {ONE_PASS_BYTES} on CUDA){alt}; or use the two-pass path (path='two_pass')")
    n = -(-max(M, 1) // cmax)
    c = -(-max(M, 1) // n)
    if n > 1 and c > 16:
        c = min(cmax, -(-c // 16) * 16)
    chunks = int(-(-M // c)) if M else 0
    dw32 = acc > 0 and mode == "fp32"
    per_chunk = need_weight and grad_dtype in NARROW and acc == 0
    return OnePassPlan(int(c), int(cmax), chunks, dw32, int(c * per), acc, int(budget), mode,
                       max(chunks, 1) if per_chunk else 1, int(cast_b))


# ------------------------------------------------------------------------------ the row steps
class TorchRows:
    """The two row steps in torch ops (the CPU form; any device), on torch_chunked's shared helpers
    (``scale_logits_``, ``logits_grad_``). ``stats`` leaves ``z - max`` in ``z`` and ``exp(z - max)``
    beside it for ``dz``."""

    def stats(self, z, bias, tgt, p: LogprobParams):
        z, self.t = scale_logits_(z, bias, p)
        m = z.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        z -= m
        if bias is not None:                          # -inf logits (bias): keep 0 * z finite
            z.clamp_(min=torch.finfo(z.dtype).min)
        self.e = torch.exp(z)
        s = self.e.sum(-1)
        t = torch.bmm(self.e.unsqueeze(1), z.unsqueeze(2)).reshape(-1)
        self.log_s = torch.log(s)
        self.s = s
        lse = m.squeeze(1) + self.log_s
        ent = self.log_s - t / s
        logp = z.gather(1, tgt.unsqueeze(1)).squeeze(1) - self.log_s
        return torch.stack([lse, ent, logp])

    def dz(self, z, dtype, bias, tgt, st, gl, ge, p, K):
        """``dz [K, V]`` of the first ``K`` rows in ``dtype``: in place in the ``exp`` buffer of
        ``stats`` (a copy for a narrower ``dtype``); ``z`` is scratch."""
        z, e = z[:K], self.e[:K]
        gl = gl[:K]
        z -= self.log_s[:K].unsqueeze(1)              # log p
        e /= self.s[:K].unsqueeze(1)                  # p
        t = None if self.t is None else self.t[:K]
        z = logits_grad_(z, tgt[:K], gl, gl, None if ge is None else ge[:K], st[1, :K], p.temperature,
                         tanh=t, prob=e)
        dead = (gl == 0) if ge is None else ((gl == 0) & (ge[:K] == 0))
        if any_true(dead):                            # exact zeros (NaN rows included)
            z.index_fill_(0, nonzero_rows(dead), 0.0)
        self.e = self.t = None
        return z if dtype == z.dtype else z.to(dtype)


def _rows_impl(kind: str):
    if kind == "triton":
        from .triton_onepass import TritonRows
        return TritonRows()
    return TorchRows()


# ------------------------------------------------------------------------------ host plan
def _host_ints(x: torch.Tensor, meta_value: int) -> list[int]:
    """``x.tolist()`` (one sync); on ``meta`` every entry is ``meta_value``."""
    if is_meta(x):
        return [meta_value] * x.numel()
    return [int(v) for v in x.tolist()]


def _last_true(mask: torch.Tensor) -> int:
    """1 + the index of the last True of a 1-D mask (0 if none); the whole length on ``meta``."""
    if is_meta(mask):
        return mask.numel()
    nz = mask.nonzero()
    return int(nz[-1, 0]) + 1 if nz.numel() else 0


def row_order(targets, ignore_index, hint=None, seq_len=None):
    """``(rows int64 [M], chunk sizes or None)``: the non-ignored rows, hinted rows (sequences) first.
    With ``seq_len`` the rows of each sequence stay together and the per-sequence row counts are
    returned (for packing whole sequences)."""
    valid = targets != ignore_index
    if seq_len is None:
        rows = nonzero_rows(valid)
        if hint is not None:
            rows = rows[torch.argsort((~hint[rows]).to(torch.int8), stable=True)]
        return rows, None
    T = seq_len
    B = targets.numel() // T
    vb = valid.reshape(B, T)
    seqs = torch.arange(B, device=targets.device)
    if hint is not None:
        seqs = torch.argsort((~(hint.reshape(B, T) & vb).any(-1)).to(torch.int8), stable=True)
    perm = (seqs[:, None] * T + torch.arange(T, device=targets.device)).reshape(-1)
    rows = perm[nonzero_rows(vb[seqs].reshape(-1))]
    return rows, _host_ints(vb[seqs].sum(-1), T)


def chunks_of(M: int, C: int, seq_counts=None, budget_rows: int | None = None):
    """``[(start, end)]`` over the ordered rows: balanced chunks of ``C`` rows, or whole sequences
    packed greedily into chunks of at most ``budget_rows`` rows."""
    if seq_counts is None:
        return [(s, min(M, s + C)) for s in range(0, M, C)]
    cap = budget_rows or C
    out, s, cur = [], 0, 0
    for n in seq_counts:
        if n > cap:
            raise SequenceTooLong(
                f"the one-pass path needs whole sequences in a chunk for this config (its coefficients "
                f"depend on the whole sequence), but a sequence has {n} tokens and a chunk holds {cap} "
                "rows: raise UPG_KERNELS_ONE_PASS_BYTES or use the two-pass path")
        if cur + n > cap and cur:
            out.append((s, s + cur))
            s, cur = s + cur, 0
        cur += n
    if cur:
        out.append((s, s + cur))
    return out


def forward_with_grads(hidden, weight, bias, targets, p: LogprobParams, coef_fn, *, budget=None,
                       rows_impl: str = "torch", hint=None, seq_len=None, need_hidden=True,
                       need_weight=True, need_bias=True, mode=None):
    """``(logp, ent, lse, dh, dw, db)`` with the gradients of the loss whose coefficients
    ``coef_fn(logp [N], ent [N], done [N] bool) -> (g_lp [N], g_H [N])`` gives (read at the rows of
    ``done``, the current chunk: token-local configs, or whole sequences with ``seq_len``).
    ``mode``: :data:`DW_MODES` (default :func:`dw_mode`). ``dw`` is the float32 accumulator when
    the plan has one (the caller scales and casts it once), a :class:`PairGrad` in mode
    ``compensated`` (the caller calls ``finish``), else the gradient itself in the weight's dtype;
    ``dh`` and ``db`` are in the inputs' dtypes.
    ``rows_impl``: ``"triton"`` (the row kernels) or ``"torch"`` (:class:`TorchRows`)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    op_dt = hidden.dtype
    need_bias = need_bias and bias is not None
    rows, seq_counts = row_order(targets, p.ignore_index, hint, seq_len)
    M = rows.numel()
    torch_rows = rows_impl != "triton"
    gpu = (dev.type in ("cuda", "meta")) and not _interp()
    pl = plan(M, H, V, hidden.dtype, budget, need_hidden=need_hidden, need_weight=need_weight,
              torch_rows=torch_rows, softcap=bool(p.softcap), gpu=gpu, w_dtype=weight.dtype, mode=mode)
    spans = chunks_of(M, pl.chunk_rows, seq_counts, pl.max_rows)
    C = max((b - a for a, b in spans), default=0)

    logp = torch.zeros(N, dtype=cd, device=dev)
    ent = torch.zeros(N, dtype=cd, device=dev)
    lse = torch.zeros(N, dtype=cd, device=dev)
    dh = torch.zeros(N, H, dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = None
    if need_weight:
        dw = torch.zeros(V, H, dtype=torch.float32 if pl.dw_fp32 else weight.dtype, device=dev)
    lo = pbuf = None
    if need_weight and pl.dw_pair:                  # the gradient holds hi; lo and a product slab
        lo = torch.zeros(V, H, dtype=torch.bfloat16, device=dev)
        pbuf = torch.empty(min(V, PAIR_SLAB_ROWS), H, dtype=torch.float32, device=dev)
    db_acc = torch.zeros(1, V, dtype=cd, device=dev) if need_bias else None
    if M == 0:
        return _finish(logp, ent, lse, dh, dw, db_acc, bias)
    zbuf = torch.empty(C * V, dtype=cd, device=dev)
    hbuf = torch.empty(C, H, dtype=hidden.dtype, device=dev)
    dhbuf = torch.empty(C, H, dtype=hidden.dtype, device=dev) if need_hidden else None
    slabs = WeightSlabs(weight, op_dt)          # autocast: W cast slab by slab (else W itself)
    dh32 = torch.empty(C, H, dtype=torch.float32, device=dev) if need_hidden and slabs.cast else None
    ones = torch.ones(1, C, dtype=op_dt, device=dev) if need_bias else None
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    ops = _rows_impl(rows_impl)
    wt = weight.t()
    for a, b in spans:
        g = b - a
        idx = rows[a:b]
        h_c = torch.index_select(hidden, 0, idx, out=hbuf[:g])
        z = zbuf[:g * V].view(g, V)
        if cd == torch.float64:
            torch.mm(h_c, wt, out=z)
        elif slabs.cast:
            for v0, v1 in slabs.bounds():
                mm_f32(h_c, slabs(v0, v1).t(), out=z[:, v0:v1])
        else:
            mm_f32(h_c, wt, out=z)
        tgt = targets.index_select(0, idx)
        st = ops.stats(z, bias, tgt, p)
        lse.index_copy_(0, idx, st[0].to(cd))
        ent.index_copy_(0, idx, st[1].to(cd))
        logp.index_copy_(0, idx, st[2].to(cd))
        done.zero_()
        done.index_fill_(0, idx, True)
        g_lp, g_H = coef_fn(logp, ent, done)
        gl = g_lp.index_select(0, idx).to(cd).contiguous()
        ge = g_H.index_select(0, idx).to(gl.dtype).contiguous()
        act = (gl != 0) | (ge != 0)
        K = _last_true(act)
        if K == 0:
            continue
        dzk = ops.dz(z, op_dt, bias, tgt, st, gl, ge if _any(ge) else None, p, K)
        hk = h_c[:K]
        if not is_meta(act) and not bool(act[:K].all()):
            hk.masked_fill_(~act[:K].unsqueeze(1), 0)        # 0 * NaN: keep dW finite
        if need_hidden and slabs.cast:
            acc = dh32[:K]
            acc.zero_()
            for v0, v1 in slabs.bounds():
                mm_acc(acc, dzk[:, v0:v1], slabs(v0, v1))
            dh.index_copy_(0, idx[:K], dhbuf[:K].copy_(acc))
        elif need_hidden:
            torch.mm(dzk, weight, out=dhbuf[:K])
            dh.index_copy_(0, idx[:K], dhbuf[:K])
        if need_weight and lo is not None:
            pair_acc_(dw, lo, pbuf, dzk, hk, rows_impl == "triton")
        elif need_weight:
            mm_acc(dw, dzk.t(), hk)
        if need_bias:
            mm_acc(db_acc, ones[:, :K], dzk)
    if lo is not None:
        dw = PairGrad(dw, lo, pbuf.shape[0])
    return _finish(logp, ent, lse, dh, dw, db_acc, bias)


class PairGrad:
    """dW of mode ``compensated`` between the forward and the backward: the gradient ``hi`` (bf16 /
    fp16) and its bf16 remainder ``lo``. :meth:`finish` scales by ``grad_output`` and rounds once."""

    def __init__(self, hi: torch.Tensor, lo: torch.Tensor, slab_rows: int):
        self.hi, self.lo, self.slab_rows = hi, lo, slab_rows

    def finish(self, grad: torch.Tensor) -> torch.Tensor:
        """``hi = round((hi + lo) * grad)`` slab by slab (float32 temporaries of one slab), in place;
        returns ``hi`` and lets go of ``lo``."""
        hi, lo, S = self.hi, self.lo, self.slab_rows
        g = grad.to(torch.float32)
        for v0 in range(0, hi.shape[0], S):
            t = lo[v0:v0 + S].float()
            t.add_(hi[v0:v0 + S]).mul_(g)
            hi[v0:v0 + S].copy_(t)
        self.lo = None
        return hi


def pair_add_torch_(hi: torch.Tensor, lo: torch.Tensor, p: torch.Tensor) -> None:
    """``(hi, lo) += p`` in torch ops (the CPU form of ``triton_onepass._op_pair_kernel``): ``s = hi +
    (lo + p)`` in float32, ``hi = round(s)``, ``lo = bf16(s - hi)``; ``p`` is scratch."""
    p.add_(lo)
    p.add_(hi)
    hi.copy_(p)
    p.sub_(hi)
    lo.copy_(p)


def pair_acc_(hi, lo, pbuf, dz, h, triton_rows: bool) -> None:
    """``(hi, lo) += dz^T h`` slab by slab: each slab's product in float32 (``pbuf``), then the
    compensated update (the Triton kernel with the Triton row steps, else torch ops)."""
    S = pbuf.shape[0]
    if triton_rows:
        from .triton_onepass import pair_add_
    else:
        pair_add_ = pair_add_torch_
    for v0 in range(0, hi.shape[0], S):
        v1 = min(hi.shape[0], v0 + S)
        p = pbuf[:v1 - v0]
        mm_f32(dz[:, v0:v1].t(), h, out=p)
        pair_add_(hi[v0:v1], lo[v0:v1], p)


def _any(x: torch.Tensor) -> bool:
    return any_true(x != 0)


def _interp() -> bool:
    from .._backend import interpreter_on
    return interpreter_on()


def _finish(logp, ent, lse, dh, dw, db_acc, bias):
    db = None if db_acc is None else db_acc[0].to(bias.dtype)
    return logp, ent, lse, dh, dw, db
