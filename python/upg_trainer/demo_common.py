"""What the demo suites share (``demo.py``, ``demo_preference.py``): a run's config derived from the
demo's, the environment record and the report files."""
from __future__ import annotations

import copy
import json
import os

from .config import Config, validate
from .methods import get_method


def _derive(cfg: Config, command: str, out: str, **sections) -> Config:
    c = copy.deepcopy(cfg)
    c.command = command
    c.output.dir = out
    c.output.overwrite = True
    c.output.resume = False
    for sec, vals in sections.items():
        for k, v in vals.items():
            setattr(getattr(c, sec), k, v)
    if get_method(command).one_update:
        c.train.mini_batches = 1  # one update per step (train.mini_batches is for methods with rollouts)
    validate(c)
    return c


def run_environment() -> dict:
    """What the demo's numbers depend on beyond the seed (README: what is reproducible): library versions,
    torch threads, the CPU kernels' instruction set and BLAS. Written into demo.json."""
    import platform

    import torch
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "python": platform.python_version()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        pass
    cfg = torch.__config__.show()
    env["blas"] = "mkl" if "BLAS_INFO=mkl" in cfg else ("openblas" if "openblas" in cfg.lower() else "other")
    return env


def save_report(root, rows, table, total):
    """``demo.json`` (rows, wall time, environment) and ``demo.md`` (the table) under ``root``; prints
    the table. Shared by both demo suites."""
    with open(os.path.join(root, "demo.json"), "w") as f:
        json.dump({"runs": rows, "total_seconds": total, "environment": run_environment()}, f, indent=2)
    with open(os.path.join(root, "demo.md"), "w") as f:
        f.write(table + f"\n\ntotal wall time: {total:.0f} s\n")
    print("\n" + table)
