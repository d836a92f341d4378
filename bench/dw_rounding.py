"""The error of bf16 dW against a float64 reference, per accumulation order, by CPU emulation.

    python -m bench.dw_rounding [--N 8192,131072] [--chunks 2048,256] [--V 256] [--H 64] [--out DIR]

The one-pass path (docs/kernels.md section 1c) adds one chunk's ``dz_c^T h_c`` to dW per chunk of
rows. How that sum is kept decides the error of the bf16 dW that training sees. This script emulates
each candidate order on a ``V x H`` block of dW (the error of an element depends on the number of
rows and chunks, not on the size of the head) with GRPO-like rows: a softmax over ``V`` logits
(scale 2), targets sampled from it, advantages ``N(0, 1)`` per block of 64 rows (one sequence's
tokens share one), ``dz = A / 512 · (onehot - p)`` rounded to bf16 (as the row kernel writes it)
and hidden states ``N(0, 1)`` in bf16. Every chunking sums the same rows (:func:`block_rows`). Each
chunk's product is exact in float64 and then rounded to float32 (cuBLAS's float32 accumulation over
one chunk, whose own error is ~1e-7 and left out). The reference is the
float64 sum of the same bf16 operands, so only the accumulation order is measured.

Orders:

* ``fp32``: a float32 accumulator, rounded to bf16 once at the end (the one-pass default).
* ``per_chunk``: accumulated in the bf16 gradient, ``bf16(dW + P)`` per chunk (cuBLAS ``beta=1``
  into a bf16 output; ``UPG_KERNELS_ONE_PASS_DW=per_chunk``).
* ``compensated``: a compensated pair ``(hi, lo)`` of bf16 [V, H] (``hi`` the gradient itself, ``lo``
  ``2·V·H`` bytes): per chunk ``s = hi + (lo + P)`` in float32, ``hi = bf16(s)``, ``lo = bf16(s -
  hi)``; at the end ``bf16(hi + lo)`` (``UPG_KERNELS_ONE_PASS_DW=compensated``).
* ``two_level``: bf16 partial sums of ``sqrt(chunks)`` chunks, each added to the bf16 gradient
  (``2·V·H`` bytes; not built).
* ``once``: the exact sum rounded to bf16 (the floor: one rounding).

The error is ``max |dW - ref| / max |ref|`` over the block (the test suite's relative error) and the
Frobenius ``||dW - ref|| / ||ref||``.
"""
from __future__ import annotations

import argparse
import math

import torch

from .report import write_table

ORDERS = ("fp32", "per_chunk", "compensated", "two_level", "once")
SEQ = 512


def _bf(x):
    return x.to(torch.bfloat16).to(torch.float64)


def _f32(x):
    return x.to(torch.float32).to(torch.float64)


def rows(n: int, V: int, H: int, g: torch.Generator):
    """``(dz [n, V], h [n, H])`` in float64 holding bf16 values: GRPO-like logit gradients."""
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.0
    p = torch.softmax(z, -1)
    t = torch.multinomial(p, 1, generator=g).squeeze(1)
    adv = torch.randn((), generator=g, dtype=torch.float64).expand(n)   # a block is in one sequence
    dz = -p
    dz[torch.arange(n), t] += 1.0
    dz = _bf(dz * (adv / SEQ)[:, None])
    h = _bf(torch.randn(n, H, generator=g, dtype=torch.float64))
    return dz, h


BLOCK = 64


def block_rows(start: int, n: int, V: int, H: int, seed: int):
    """Rows ``[start, start + n)`` of one fixed data set (blocks of :data:`BLOCK` rows, each from its
    own seed), so that every chunking sums the same rows."""
    if start % BLOCK:
        raise ValueError(f"chunk starts must be multiples of {BLOCK}")
    parts = [rows(BLOCK, V, H, torch.Generator().manual_seed(seed * 1_000_003 + b))
             for b in range(start // BLOCK, -(-(start + n) // BLOCK))]
    dz, h = torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n]
    return dz, h


def emulate(N: int, C: int, V: int = 256, H: int = 64, seed: int = 0) -> dict:
    """The relative errors of each order in :data:`ORDERS` at ``N`` rows in chunks of ``C``."""
    n_chunks = -(-N // C)
    group = max(1, round(math.sqrt(n_chunks)))
    ref = torch.zeros(V, H, dtype=torch.float64)
    acc32 = torch.zeros(V, H, dtype=torch.float64)
    per = torch.zeros(V, H, dtype=torch.float64)
    hi = torch.zeros(V, H, dtype=torch.float64)
    lo = torch.zeros(V, H, dtype=torch.float64)
    two, part = torch.zeros(V, H, dtype=torch.float64), torch.zeros(V, H, dtype=torch.float64)
    for i, s in enumerate(range(0, N, C)):
        dz, h = block_rows(s, min(C, N - s), V, H, seed)
        exact = dz.t() @ h
        ref += exact
        P = _f32(exact)                               # cuBLAS: float32 result of one chunk
        acc32 = _f32(acc32 + P)
        per = _bf(per + P)
        t = _f32(hi + _f32(lo + P))                  # compensated: float32 sum, bf16 (hi, lo)
        hi = _bf(t)
        lo = _bf(_f32(t - hi))
        part = _bf(part + P)
        if (i + 1) % group == 0 or s + C >= N:
            two, part = _bf(two + part), torch.zeros_like(part)
    out = {"fp32": _bf(acc32), "per_chunk": per, "compensated": _bf(_f32(hi + lo)), "two_level": two,
           "once": _bf(ref)}
    scale, norm = ref.abs().max().item(), ref.norm().item()
    res = {"N": N, "C": C, "chunks": n_chunks, "V": V, "H": H}
    for k in ORDERS:
        err = out[k] - ref
        res[k] = {"max_rel": err.abs().max().item() / scale, "fro_rel": err.norm().item() / norm}
    return res


def table(results) -> str:
    lines = ["| N | chunk rows | chunks | " + " | ".join(ORDERS) + " |",
             "|---:|---:|---:|" + "---:|" * len(ORDERS)]
    for r in results:
        cells = " | ".join(f"{r[k]['max_rel']:.2e} ({r[k]['fro_rel']:.1e})" for k in ORDERS)
        lines.append(f"| {r['N']} | {r['C']} | {r['chunks']} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", default="8192,131072")
    ap.add_argument("--chunks", default="2048,256", help="chunk rows")
    ap.add_argument("--V", type=int, default=256)
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for dw_rounding.json / .md")
    a = ap.parse_args(argv)
    res = [emulate(int(n), int(c), a.V, a.H, a.seed) for n in a.N.split(",") for c in a.chunks.split(",")]
    md = table(res)
    print("max |err| / max |ref| (Frobenius relative error in parentheses)\n")
    print(md)
    if a.out:
        write_table(a.out, "dw_rounding", res,
                    "bf16 dW error by accumulation order (CPU emulation, `python -m bench.dw_rounding`)",
                    "max |err| / max |ref| (Frobenius relative error in parentheses); reference: float64 sum "
                    "of the same bf16 operands.", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
