"""``python -m upg_kernels.tune``: measure the path of each shape on this machine's device and write a
table that can be shipped and loaded (``UPG_KERNELS_PATH_TABLE=FILE`` or
:func:`upg_kernels.kernels.select.load_table`). docs/kernels.md, "Path selection".

Example::

    python -m upg_kernels.tune --shapes llama3-8b,4096x151936 --N 8192 --dtype bf16 --out paths.json

``--shapes``: ``HxV`` pairs, or in a source checkout the names of ``bench/shapes.py``. Each shape runs
``unified_policy_loss`` (``--config``, with ``--entropy`` its entropy bonus) once on random inputs
with measuring on (``UPG_KERNELS_AUTOTUNE=measure``); the selection writes the keys it measured (one
per shape, dtype and N bucket): the path, the dz tile where the GEMM backward's tile was timed
(``dz_tile``, else null) and each candidate's best time.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .kernels import select


def parse_shape(text: str) -> tuple[str, int, int]:
    """``(label, H, V)`` of ``HxV`` or a bench shape name."""
    t = text.strip()
    if "x" in t and all(p.isdigit() for p in t.split("x", 1)):
        H, V = (int(p) for p in t.split("x", 1))
        return t, H, V
    try:
        from bench.shapes import NAMED
    except ImportError:
        NAMED = {}
    if t not in NAMED:
        raise ValueError(f"--shapes: {t!r} is neither HxV (e.g. 4096x128256) nor a shape name "
                         f"of bench/shapes.py ({', '.join(NAMED) or 'not importable here'})")
    H, V, _ = NAMED[t]
    return t, H, V


def tune_shape(H: int, V: int, N: int, dtype: torch.dtype, device: torch.device, config: str,
               entropy: bool, seed: int = 0, backend: str = "auto") -> None:
    from . import LossConfig, unified_policy_loss
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, device=device) * (2.0 / H ** 0.5)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    adv = torch.randn(N, generator=g, device=device)
    over = {"entropy_coef": 0.01} if entropy else {"entropy_coef": 0.0}
    cfg = LossConfig.preset(config, **over)
    kw = {} if cfg.advantage == "one" else {"advantages": adv}
    out = unified_policy_loss(hidden, weight, targets, config=cfg, backend=backend, **kw)
    out.loss.backward()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m upg_kernels.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", required=True, help="comma list of HxV or bench shape names")
    p.add_argument("--N", default="8192", help="comma list of token counts (default 8192)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--config", default="grpo", help="loss preset (default grpo)")
    p.add_argument("--entropy", action="store_true", help="with an entropy bonus")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--backend", default="auto", help="backend of the loss calls (default auto)")
    p.add_argument("--out", required=True, help="the table file to write (JSON)")
    a = p.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    from .settings import DETERMINISTIC, PATH, PATH_TABLE, TRITON_DZ_CONFIG
    pins = [s.name for s in (PATH, DETERMINISTIC, PATH_TABLE, TRITON_DZ_CONFIG) if s.is_set()]
    if pins:
        p.error(f"unset {', '.join(pins)} to tune (they pin the path or the dz tile, or load a table)")
    import tempfile
    select.clear()
    select.force("measure", tempfile.mkdtemp(prefix="upg-tune-"))    # measure, never read a cache
    entries = {}
    for text in a.shapes.split(","):
        label, H, V = parse_shape(text)
        for n in a.N.split(","):
            before = set(select.measured())
            tune_shape(H, V, int(n), dt, dev, a.config, a.entropy, backend=a.backend)
            for k, entry in select.measured().items():
                if k not in before:
                    entries[k] = entry
                    tile = f" (dz tile {entry['dz_tile']})" if entry["dz_tile"] else ""
                    print(f"{label} N={n}: {k} -> {entry['path']}{tile}  {entry['times_ms']}",
                          flush=True)
    from pathlib import Path
    select.write_entries(Path(a.out), entries)
    select.force(None)
    print(f"wrote {len(entries)} entries to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
