"""The workspace budget of the bounded-memory paths (one owner; triton-free).

``UPG_KERNELS_WORKSPACE_BYTES`` (default 64 MiB) or :func:`set_workspace_bytes` bounds the buffers the
GEMM backward, the GEMM-tiled forward and the gradients-in-forward path allocate besides their inputs
and outputs. Raising it buys speed (bigger token groups: fewer passes over W, fewer dW roundings; a
float32 dW accumulator once ``4·V·H`` more bytes fit).

It also owns the **weight slab cast** (:class:`WeightSlabs`): under autocast a float32 lm_head weight
meets bf16/fp16 hidden states. The weight is never cast whole (that copy is ``2·V·H`` bytes, 1.05 GB at
llama3-8b, and autograd would keep it for the backward); the op entry passes it on as it is
(:func:`keeps_weight`), the Triton kernels cast each loaded W tile in registers, and every host GEMM
that takes W as an operand casts one slab ``W[v0:v1]`` at a time into one reused buffer of at most
``UPG_KERNELS_CAST_SLAB_BYTES`` (32 MiB by default; at least one tile of rows).
"""
from __future__ import annotations

import torch

from ..settings import CAST_SLAB_BYTES
from ..settings import WORKSPACE_BYTES as _SETTING

WORKSPACE_BYTES = _SETTING.default
_override = None


def set_workspace_bytes(n: int | None) -> None:
    """Set the backward's workspace budget in bytes (None: back to the environment / default)."""
    global _override
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ValueError(f"workspace bytes must be a positive int or None, got {n!r}")
    _override = n


def balanced_rows(M: int, max_rows: int, tile: int) -> int:
    """Rows per token group for ``M`` rows in groups of at most ``max_rows`` (a multiple of ``tile``):
    ``ceil(M / ceil(M / max_rows))`` rounded up to the tile, so the groups are about equal and there is
    no small tail group (e.g. M=8192, max 2688: 4 groups of 2048 instead of 3 x 2688 + 128)."""
    if max_rows < tile or max_rows % tile:
        raise ValueError(f"max_rows must be a positive multiple of tile={tile}, got {max_rows}")
    M = max(int(M), 1)
    n = -(-M // max_rows)
    g = -(-M // n)
    return min(max_rows, -(-g // tile) * tile)


def group_bounds(M: int, G: int, tile: int) -> list[tuple[int, int]]:
    """``[(g0, g1), ...]``: ``M`` rows in ``ceil(M / G)`` groups of at most ``G`` rows, split as evenly
    as the tile allows (every start a multiple of ``tile``, sizes within two tiles of each other), so
    the last group is no small tail either (plain ``range(0, M, G)`` with a tile-rounded G left one:
    e.g. M = 2^20, G = 2688: 390 full groups and 256 rows)."""
    if M <= 0:
        return []
    n = -(-M // G)
    cuts = [min(M, -(-(i * M) // (n * tile)) * tile) for i in range(n)] + [M]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def workspace_bytes() -> int:
    if _override is not None:
        return _override
    return _SETTING.get()


# ------------------------------------------------------------------------------ weight slab cast
_NARROW = (torch.bfloat16, torch.float16)


def keeps_weight(weight_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a weight of ``weight_dtype`` enters the kernels as it is when the call computes in
    ``dtype`` (float32 weight, bf16/fp16 compute: autocast's case), to be cast slab by slab; any other
    dtype pair is cast whole by the op entry (a float64 weight, or a narrower weight promoted)."""
    return weight_dtype == torch.float32 and dtype in _NARROW


def cast_rows(H: int, dtype: torch.dtype, align: int = 1) -> int:
    """Rows of W per cast slab: ``UPG_KERNELS_CAST_SLAB_BYTES // (H · itemsize)``, a multiple of
    ``align`` (a tile), at least one ``align``."""
    e = torch.empty((), dtype=dtype).element_size()
    rows = CAST_SLAB_BYTES.get() // (max(H, 1) * e)
    return max(align, rows // align * align)


class WeightSlabs:
    """``W[v0:v1]`` in the operand dtype ``dtype``, slab by slab: the view itself when the weight
    already has that dtype (no copy); else cast into one reused ``[rows, H]`` buffer (``rows`` of
    :func:`cast_rows`, or fewer when the caller's slabs are smaller), so a slab must be used before the
    next one is asked for. ``cast`` says whether a buffer is in use; ``rows`` is the largest slab
    the caller may ask for (``V`` without a cast: no bound needed). The one owner of the cast."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, rows: int | None = None):
        V, H = weight.shape
        self.weight = weight
        self.dtype = dtype
        self.cast = weight.dtype != dtype
        self.rows = V
        self.buf = None
        if self.cast:
            self.rows = min(V, rows if rows is not None else cast_rows(H, dtype))
            self.buf = torch.empty(self.rows, H, dtype=dtype, device=weight.device)

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def __call__(self, v0: int, v1: int) -> torch.Tensor:
        w = self.weight[v0:v1]
        if not self.cast:
            return w
        if v1 - v0 > self.rows:
            raise ValueError(f"weight slab [{v0}, {v1}) exceeds the cast buffer of {self.rows} rows")
        out = self.buf[:v1 - v0]
        out.copy_(w)            # round to nearest even, as weight.to(dtype) does
        return out

    def bounds(self, V: int | None = None) -> list[tuple[int, int]]:
        """``[(v0, v1)]`` covering the vocabulary in slabs of at most :attr:`rows` rows."""
        V = self.weight.shape[0] if V is None else V
        return [(v0, min(V, v0 + self.rows)) for v0 in range(0, V, self.rows)]


def cast_slab_bytes(H: int, dtype: torch.dtype, rows: int) -> int:
    """Bytes of the cast buffer of ``rows`` rows (for the plans' workspace accounting)."""
    return rows * H * torch.empty((), dtype=dtype).element_size()
