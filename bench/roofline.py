"""Roofline model of every kernel path at the yardstick shapes, from the code's own tiling.

    python -m bench.roofline [--N 8192] [--shapes llama3-8b,qwen2.5-7b,gemma2-2b] [--budget BYTES]

For each path it counts, for bf16 inputs with every row active: tensor-core flops, HBM bytes, L2
bytes of re-read tiles, and fp32 atomic bytes, using the block configs and plans the launchers use
(``triton_logprobs_common``, ``triton_dz``, ``gemm_backward.plan``, ``triton_gemm_fwd.plan``): the
dense plan as built (balanced token groups, the default dz tile, the dW pass beyond
``MAX_DW_ROUNDINGS`` groups). Times
are lower bounds at assumed H100 SXM rates (``RATES``, not measured here) and the binding resource is
the largest of them. These are estimates: only a GPU run (bench/gpu_run.sh) measures.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

# assumed H100 SXM rates (datasheet / common measurements), NOT measured in this project
RATES = {"tc_flops": 790e12,      # dense bf16 tensor-core rate reached by cuBLAS (of 989 peak)
         "hbm": 3.35e12,          # HBM3 bytes/s
         "l2": 10e12,             # L2 read bytes/s (order of magnitude)
         "atomic": 3e12}          # L2 fp32 reduction bytes/s (order of magnitude; unknown)


@dataclass
class Cost:
    path: str
    flops: float
    hbm: float
    l2: float
    atomics: float
    per_group: float = 0.0    # seconds: sum over token groups of max(tensor-core, HBM) time

    def times(self):
        t = {"tensor cores": self.flops / RATES["tc_flops"], "HBM": self.hbm / RATES["hbm"],
             "L2": self.l2 / RATES["l2"], "atomics": self.atomics / RATES["atomic"]}
        if self.per_group > 1.001 * t["tensor cores"]:   # only when a group is HBM-bound
            t["per-group tc/HBM"] = self.per_group
        return t

    def bound(self):
        t = self.times()
        k = max(t, key=t.get)
        return k, t[k]


def _cfgs():
    from upg_kernels.kernels import triton_logprobs_common as c
    from upg_kernels.kernels import triton_dz
    import torch
    return c._FWD_GPU, c._BWD_GPU, triton_dz.dz_config(torch.bfloat16, gpu=True), torch.bfloat16


def costs(N: int, H: int, V: int, budget: int | None = None) -> list[Cost]:
    """The per-path costs at one shape (bf16, all rows active)."""
    from upg_kernels.kernels import gemm_backward, triton_gemm_fwd, workspace
    fwd, bwd, dzc, bf16 = _cfgs()
    e = 2
    budget = budget or workspace.workspace_bytes()
    out = []
    # fused forward: one program per (token block, split) loops over its vocabulary tiles; each tile
    # loads the block's hidden rows and the tile's W rows (from L2 when another program read them)
    tiles = (N / fwd.block_n) * (V / fwd.block_v)
    l2 = tiles * (fwd.block_n + fwd.block_v) * H * e
    resident = 132 / 8                     # token blocks resident at once (132 SMs, ~8 splits)
    w_passes = max(1.0, (N / fwd.block_n) / resident)
    out.append(Cost("forward, fused kernel", 2 * N * H * V, V * H * e * w_passes + N * H * e, l2, 0))
    # GEMM-tiled forward: cuBLAS logits slabs in float32 + the row-stats kernel reading them back
    G, S = triton_gemm_fwd.plan(N, V, budget, gpu=True)
    groups = -(-N // G)
    out.append(Cost(f"forward, GEMM-tiled (G={G}, S={S})", 2 * N * H * V,
                    groups * V * H * e + N * H * e + 2 * 4 * N * V, 0, 0))
    # atomic backward: recompute + two products per (token block, tile), fp32 atomics of dh and dW
    tiles = (N / bwd.block_n) * (V / bwd.block_v)
    atom = tiles * (bwd.block_n + bwd.block_v) * H * 4
    l2 = tiles * 3 * (bwd.block_n + bwd.block_v) * H * e
    out.append(Cost("backward, atomic kernel", 6 * N * H * V, V * H * e * w_passes + N * H * e + 4 * V * H,
                    l2, atom))
    # GEMM backward as built (gemm_backward.plan: balanced token groups, the dz tile of dz_config):
    # per token group: dz kernel (reads W_s, writes dz), dh GEMM (reads dz, W_s, dh_acc fp32 in/out),
    # dW GEMM (reads dz, h_g, dW_s in/out); no reuse across kernels assumed. With more token groups
    # than MAX_DW_ROUNDINGS (bf16 dW, no float32 [V, H] accumulator) dW gets its own slab-outer pass:
    # the dz blocks again (2·N·H·V flops), the float32 slab accumulator read + written per group.
    pl = gemm_backward.plan(N, H, V, bf16, budget, gather=False, gpu=True)
    G, S = pl.group_rows, pl.slab_cols
    ng = pl.n_groups(N)
    dz = N * V * e
    two_pass = pl.dw_mode == "pass"
    hbm = (ng * V * H * e            # dz kernel: W
           + dz                      # dz written
           + dz + ng * V * H * e     # dh GEMM: dz, W
           + (V / S) * N * H * 4 * 2)  # dh_acc read + written per slab
    tiles_l2 = (N / dzc.block_n) * (V / dzc.block_v) * (dzc.block_n + dzc.block_v) * H * e
    if two_pass:
        ngw = pl.n_groups(N) if not pl.dw_group_rows else -(-N // pl.dw_group_rows)
        hbm += (ngw * V * H * e + 2 * dz        # dz kernel again: W, dz written
                + dz + (V / pl.dw_slab_cols) * N * H * e   # dW GEMM: dz, h_g per slab
                + ngw * V * H * 4 * 2          # the float32 slab accumulator per group
                + V * H * e)                   # dW written once
        flops, l2 = 8 * N * H * V, 2 * tiles_l2
        how = f"dW pass: G_w={pl.dw_group_rows}, S_w={pl.dw_slab_cols}, one rounding"
    else:
        hbm += dz + (V / S) * N * H * e + ng * V * H * (4 if pl.dw_fp32 else e) * 2   # dW GEMM
        flops, l2 = 6 * N * H * V, tiles_l2
        how = f"dW {'fp32' if pl.dw_fp32 else 'bf16'}, {pl.dw_roundings(N, bf16)} rounding(s)"
    out.append(Cost(f"backward, GEMM (G={G}, S={S}, {ng} group(s), dz {dzc.block_n}x{dzc.block_v}, "
                    f"{how})", flops, hbm, l2, 0, group_seconds(pl.bounds(N), H, V, e, pl.dw_fp32)))
    kernels = one_pass_kernels(N, H, V)
    out.append(Cost(f"one pass, fwd+bwd ({one_pass_label(N, H, V)})", sum(k.flops for k in kernels),
                    sum(k.hbm for k in kernels), 0, 0))
    return out


def one_pass_plan(N, H, V, budget=None, mode=None):
    """``(plan, note)``: ``one_pass.plan`` (bf16, GPU rules) at ``budget`` (default: the library's);
    where that budget is refused (the float32 dW accumulator does not fit), the plan at the
    accumulator plus 1 GiB of chunks, with a note saying so."""
    import torch
    from upg_kernels.kernels import one_pass
    try:
        return one_pass.plan(N, H, V, torch.bfloat16, budget, gpu=True, mode=mode), ""
    except ValueError:
        acc = one_pass.acc_bytes(V, H, torch.bfloat16, mode or one_pass.dw_mode())
        b2 = acc + 2**30
        return (one_pass.plan(N, H, V, torch.bfloat16, b2, gpu=True, mode=mode),
                f"; the default budget is refused, modelled at {b2 / 2**30:.2f} GiB")


def pl_slab(V: int) -> int:
    from upg_kernels.kernels import one_pass
    return min(V, one_pass.PAIR_SLAB_ROWS)


def one_pass_label(N, H, V, budget=None, mode=None) -> str:
    pl, note = one_pass_plan(N, H, V, budget, mode)
    dw = ("dW fp32" if pl.dw_fp32 else "dW compensated bf16 pair" if pl.dw_pair
          else f"dW bf16, {pl.dw_roundings} rounding(s)")
    return f"C={pl.chunk_rows}, {pl.n_chunks} chunk(s), {dw}, {pl.total_bytes / 2**30:.2f} GiB{note}"


def one_pass_kernels(N: int, H: int, V: int, budget: int | None = None, mode: str | None = None) -> list[Cost]:
    """The one-pass path as built (``kernels/one_pass.py``, bf16, every row active), one entry per
    kernel summed over the chunks: its GEMMs read their operands and write their result once from HBM
    (bf16 operands, float32 logits; dW read and written per chunk: the float32 accumulator, or the
    bf16 gradient in mode ``per_chunk``), the row kernels stream the float32 logits."""
    pl, _ = one_pass_plan(N, H, V, budget, mode)
    n = pl.n_chunks
    e, f = 2, 4
    wh = V * H
    acc = f if pl.dw_fp32 else e
    if pl.dw_pair:       # compensated: the product slab written in float32, then (hi, lo) += P
        dw_gemm = Cost("dW GEMM P = dz^T h_c per slab (float32 out)", 2 * N * H * V,
                       N * V * e + (V / pl_slab(V)) * N * H * e + n * wh * f, 0, 0)
    else:
        dw_gemm = Cost(f"dW GEMM dW += dz^T h_c ({'float32 accumulator' if pl.dw_fp32 else 'bf16 gradient, beta=1'})",
                       2 * N * H * V, N * V * e + N * H * e + n * wh * acc * 2, 0, 0)
    ks = [
        Cost("gather hidden rows", 0, 2 * N * H * e, 0, 0),
        Cost("logits GEMM z = h_c W^T (float32 out)", 2 * N * H * V, n * wh * e + N * H * e + N * V * f, 0, 0),
        Cost("stats row kernel (reads z)", 0, N * V * f, 0, 0),
        Cost("dz row kernel (reads z, writes bf16 dz in place)", 0, N * V * (f + e), 0, 0),
        Cost("dh GEMM dz W", 2 * N * H * V, N * V * e + n * wh * e + N * H * e, 0, 0),
        dw_gemm,
    ]
    if pl.dw_pair:
        ks.append(Cost("compensated update (hi, lo) += P (reads P, hi, lo; writes hi, lo)", 0,
                       n * wh * (f + 4 * e), 0, 0))
        ks.append(Cost("dW zeroed (hi, lo), (hi + lo) scaled and rounded once", 0, wh * (4 * e + e), 0, 0))
    elif pl.dw_fp32:
        ks.append(Cost("dW accumulator zeroed, scaled and cast once", 0, wh * (f + f + e), 0, 0))
    else:
        ks.append(Cost("dW zeroed, scaled in place", 0, wh * (e + e + e), 0, 0))
    return ks


def one_pass_table(N: int, shapes, budget: int | None = None, mode: str | None = None) -> str:
    """Per-kernel estimate of the one-pass path: each kernel's time is the larger of its tensor-core
    and HBM times; the kernels run one after another, so the path's estimate is their sum."""
    rows = ["| shape | N | kernel (all chunks) | TFLOP | HBM GB | ms (estimate) |", "|---|---|---|---|---|---|"]
    for name in shapes:
        H, V = SHAPES[name]
        total = 0.0
        for k in one_pass_kernels(N, H, V, budget, mode):
            t = max(k.times()["tensor cores"], k.times()["HBM"])
            total += t
            rows.append(f"| {name} | {N} | {k.path} | {k.flops / 1e12:.1f} | {k.hbm / 1e9:.1f} | {t * 1e3:.1f} |")
        rows.append(f"| {name} | {N} | **sum** ({one_pass_label(N, H, V, budget, mode)}) | | | **{total * 1e3:.1f}** |")
    return "\n".join(rows)


def group_seconds(bounds, H: int, V: int, e: int, dw_fp32: bool) -> float:
    """Sum over the token groups ``bounds`` of max(tensor-core time, HBM time) of one group of the
    fused group loop: 6·g·H·V flops; W read by the dz kernel and the dh GEMM, dW read + written,
    dz written and read twice. A small group (a tail) is HBM-bound: it pays a whole pass over W and
    dW for few rows, which the balanced plan avoids."""
    total = 0.0
    for g0, g1 in bounds:
        g = g1 - g0
        hbm = 2 * V * H * e + 2 * V * H * (4 if dw_fp32 else e) + 3 * g * V * e
        total += max(6 * g * H * V / RATES["tc_flops"], hbm / RATES["hbm"])
    return total


SHAPES = {"llama3-8b": (4096, 128256), "qwen2.5-7b": (3584, 152064), "gemma2-2b": (2304, 256000),
          "qwen3.5-27b": (5120, 248320)}


def table(N: int, shapes, budget: int | None = None) -> str:
    rows = ["| shape | N | path | TFLOP | HBM GB | L2 GB | atomics GB | ms at tensor-core rate | "
            "bound (estimate) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in shapes:
        H, V = SHAPES[name]
        for c in costs(N, H, V, budget):
            k, t = c.bound()
            rows.append(f"| {name} | {N} | {c.path} | {c.flops / 1e12:.1f} | {c.hbm / 1e9:.1f} | "
                        f"{c.l2 / 1e9:.0f} | {c.atomics / 1e9:.0f} | {c.flops / RATES['tc_flops'] * 1e3:.1f} | "
                        f"{k} ({t * 1e3:.1f} ms) |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--budget", type=int, default=None, help="workspace bytes (default: the library's)")
    ap.add_argument("--one-pass-budget", type=int, default=None,
                    help="the one-pass budget in bytes (default: the library's, UPG_KERNELS_ONE_PASS_BYTES)")
    ap.add_argument("--one-pass-dw", default=None, help="the one-pass dW mode: fp32, compensated or per_chunk")
    a = ap.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    print(table(a.N, shapes, a.budget))
    print("\none-pass path, per kernel (run one after another):\n")
    print(one_pass_table(a.N, shapes, a.one_pass_budget, a.one_pass_dw))
    print(f"\nassumed rates (not measured): {RATES}")


if __name__ == "__main__":
    main()
