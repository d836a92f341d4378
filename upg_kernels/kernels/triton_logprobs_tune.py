"""Time the Triton log-prob kernels for candidate block configs on the current GPU.

    python -m upg_kernels.kernels.triton_logprobs_tune --n 8192 --h 4096 --v 128256
    python -m upg_kernels.kernels.triton_logprobs_tune --fwd 128,128,64,8,3 64,256,64,8,3 \
        --bwd 128,128,64,8,3 128,64,64,8,3 --dz 128,128,64,8,3 128,256,64,8,3 \
        --workspace 67108864 1073741824

Prints the median forward and backward time (CUDA events), TFLOP/s (forward 2·N·H·V flops,
backward 6·N·H·V) and the peak memory above the inputs and gradients. ``--bwd`` times the atomic
backward ("triton_atomic"), ``--dz`` the GEMM backward ("triton", the default) with each dz-kernel
config, at each ``--workspace`` budget. Configs are "BLOCK_N,BLOCK_V,BLOCK_H,num_warps,num_stages[,group_n]";
a winner becomes the default in ``triton_logprobs_common`` / ``triton_dz`` (or is set with
``UPG_KERNELS_TRITON_FWD_CONFIG`` / ``_BWD_CONFIG`` / ``_DZ_CONFIG``).
"""
from __future__ import annotations

import argparse
import os

import torch

from .. import settings
from . import gemm_backward, workspace
from .contract import LogprobParams
from . import triton_logprobs_bwd as bwd
from . import triton_logprobs_fwd as fwd


def _median_ms(fn, reps):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--fwd", nargs="*", default=[""], help="forward configs ('' = default)")
    ap.add_argument("--bwd", nargs="*", default=[], help="atomic backward configs ('' = default)")
    ap.add_argument("--dz", nargs="*", default=[""], help="GEMM backward dz-kernel configs ('' = default)")
    ap.add_argument("--workspace", nargs="*", type=int, default=[0],
                    help="GEMM backward workspace budgets in bytes (0 = default)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    dt = getattr(torch, a.dtype)
    N, H, V = a.n, a.h, a.v
    h = torch.randn(N, H, device="cuda").to(dt)
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).to(dt)
    t = torch.randint(0, V, (N,), device="cuda")
    gl = torch.randn(N, device="cuda")
    ge = torch.randn(N, device="cuda") * 0.1
    p = LogprobParams()
    flop = 2.0 * N * H * V
    for cfg in a.fwd:
        os.environ[settings.TRITON_FWD_CONFIG.name] = cfg
        fwd.forward(h, w, None, t, p)                  # compile
        ms = _median_ms(lambda: fwd.forward(h, w, None, t, p), a.reps)
        print(f"fwd {cfg or 'default':>22}: {ms:8.2f} ms  {flop / ms / 1e9:7.1f} TFLOP/s")
    _, ent, lse = fwd.forward(h, w, None, t, p)
    def time_bwd(label, run):
        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = _median_ms(run, a.reps)
        extra = torch.cuda.max_memory_allocated() - base - (N + V) * H * h.element_size()
        print(f"{label}: {ms:8.2f} ms  {3 * flop / ms / 1e9:7.1f} TFLOP/s  "
              f"extra memory {extra / 2**20:8.1f} MiB")

    for cfg in a.bwd:
        os.environ[settings.TRITON_BWD_CONFIG.name] = cfg
        time_bwd(f"bwd atomic {cfg or 'default':>22}",
                 lambda: bwd.backward(h, w, None, t, lse, ent, gl, ge, p, True, True, False))
    for ws in a.workspace:
        workspace.set_workspace_bytes(ws or None)
        for cfg in a.dz:
            os.environ[settings.TRITON_DZ_CONFIG.name] = cfg
            time_bwd(f"bwd gemm ws={ws or 'default'} dz {cfg or 'default':>22}",
                     lambda: gemm_backward.backward(h, w, None, t, lse, ent, gl, ge, p, True, True, False))
    workspace.set_workspace_bytes(None)


if __name__ == "__main__":
    main()
