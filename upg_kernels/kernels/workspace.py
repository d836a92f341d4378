"""The workspace budget of the bounded-memory paths (one owner; triton-free).

``UPG_KERNELS_WORKSPACE_BYTES`` (default 64 MiB) or :func:`set_workspace_bytes` bounds the buffers the
GEMM backward, the GEMM-tiled forward and the gradients-in-forward path allocate besides their inputs
and outputs. Raising it buys speed (bigger token groups: fewer passes over W, fewer dW roundings; a
float32 dW accumulator once ``4·V·H`` more bytes fit).
"""
from __future__ import annotations

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
