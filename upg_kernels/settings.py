"""Every environment variable that upg-kernels and its benchmarks read, read here and only here.

Each variable is a :class:`Setting` row of :data:`SETTINGS` (name, kind, default, meaning); callers ask
the row (``settings.WORKSPACE_BYTES.get()``) at call time, so a change of the environment takes effect
at the next call. One parser per kind: booleans accept ``1/true/yes/on`` and ``0/false/no/off``
(any case; unset or empty = the default), byte sizes are positive integers, choices are matched
lower-cased. A value that does not parse raises a ValueError naming the variable and what it expects.

The table in docs/settings.md is :func:`markdown_table` (tests/test_settings.py keeps the two equal).
From the library this module imports only :mod:`upg_kernels.path_names` (the path names, a module that
imports nothing), so it stays light: no torch, no triton.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .path_names import PATH_NAMES

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"{name} must be one of {'/'.join(TRUE)} or {'/'.join(FALSE)}, got {raw!r}")


def parse_bytes(name: str, raw: str) -> int:
    try:
        n = int(raw.strip())
    except ValueError:
        n = -1
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer (bytes), got {raw!r}")
    return n


def parse_config(name: str, raw: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in raw.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (5, 6) or min(vals) <= 0:
        raise ValueError(f"{name} must be 'BLOCK_N,BLOCK_V,BLOCK_H,num_warps,num_stages[,group_n]' "
                         f"(positive integers), got {raw!r}")
    return vals


@dataclass(frozen=True)
class Setting:
    """One environment variable: ``kind`` is ``bool``, ``bytes``, ``choice`` (one of ``choices``),
    ``config`` (a block config, see :func:`parse_config`) or ``text``; ``default`` is the value when
    it is unset or empty (None: no value, the caller decides); ``scope`` says who reads it."""
    name: str
    kind: str
    default: object
    meaning: str
    choices: tuple[str, ...] = ()
    scope: str = "library"

    def raw(self) -> str | None:
        """The stripped value in the environment; None when unset or empty."""
        v = os.environ.get(self.name)
        return v.strip() if v is not None and v.strip() else None

    def is_set(self) -> bool:
        return self.raw() is not None

    def get(self):
        """The parsed value (the default when unset or empty)."""
        raw = self.raw()
        if raw is None:
            return self.default
        if self.kind == "bool":
            return parse_bool(self.name, raw)
        if self.kind == "bytes":
            return parse_bytes(self.name, raw)
        if self.kind == "config":
            return parse_config(self.name, raw)
        if self.kind == "choice":
            v = raw.lower()
            if v not in self.choices:
                raise ValueError(f"{self.name} must be one of {self.choices}, got {raw!r}")
            return v
        return raw


MiB = 2**20

BACKEND = Setting(
    "UPG_KERNELS_BACKEND", "text", "auto",
    "what `backend=\"auto\"` (or None) resolves to: `auto` or a backend name of the backend table "
    "(checked by `resolve_backend`)")
WORKSPACE_BYTES = Setting(
    "UPG_KERNELS_WORKSPACE_BYTES", "bytes", 64 * MiB,
    "workspace budget of the GEMM backward, the GEMM-tiled forward and the gradients-in-forward path "
    "(`set_workspace_bytes` overrides it)")
TORCH_CHUNK_BYTES = Setting(
    "UPG_KERNELS_TORCH_CHUNK_BYTES", "bytes", 64 * MiB,
    "bytes of one float32 chunk x V logits block of the torch backend")
CAST_SLAB_BYTES = Setting(
    "UPG_KERNELS_CAST_SLAB_BYTES", "bytes", 32 * MiB,
    "bound of the weight slab cast to the compute dtype when the weight is float32 and the compute "
    "dtype is bf16/fp16 (autocast): W is cast slab by slab, never whole (kernels/workspace.py)")
TRITON_FORWARD = Setting(
    "UPG_KERNELS_TRITON_FORWARD", "choice", "fused",
    "forward path of the Triton backends: `fused` (one kernel) or `gemm` (cuBLAS logits slabs + a row "
    "kernel)", choices=("fused", "gemm"))
TRITON_FWD_CONFIG = Setting(
    "UPG_KERNELS_TRITON_FWD_CONFIG", "config", None,
    "block config of the fused forward kernel, `BN,BV,BH,warps,stages` (tuning; GPU only)")
TRITON_BWD_CONFIG = Setting(
    "UPG_KERNELS_TRITON_BWD_CONFIG", "config", None,
    "block config of the atomic backward kernel, `BN,BV,BH,warps,stages[,group]` (tuning; GPU only)")
TRITON_DZ_CONFIG = Setting(
    "UPG_KERNELS_TRITON_DZ_CONFIG", "config", None,
    "tile of the GEMM backward's dz kernel: `128x128` (the default) or `128x64` (bf16/fp16, H a "
    "multiple of 64), or a full block config `BN,BV,BH,warps,stages[,group]` for every launch (tuning; "
    "GPU only). Unset: the path selection times both tiles; set: a pin (only the paths are timed)")
TRITON_DW_SLAB_BYTES = Setting(
    "UPG_KERNELS_TRITON_DW_SLAB_BYTES", "bytes", None,
    "float32 dW slab per launch of the atomic backward (default 16 MiB, grown up to 4x for small "
    "batches; a set value is never grown)")
FUSED_EPILOGUE = Setting(
    "UPG_KERNELS_FUSED_EPILOGUE", "bool", True,
    "the fused Triton loss epilogue where it applies (`fused_epilogue=None`); `0` forces the PyTorch "
    "epilogue")
GRAD_IN_FORWARD = Setting(
    "UPG_KERNELS_GRAD_IN_FORWARD", "bool", False,
    "the one-pass path (gradients in the forward pass) for `unified_policy_loss` calls with "
    "`grad_in_forward=None`; where a sequence-level config's sequence does not fit a chunk, the two-pass "
    "path runs. The older spelling of `UPG_KERNELS_PATH=one_pass`")
ONE_PASS_BYTES = Setting(
    "UPG_KERNELS_ONE_PASS_BYTES", "bytes", 3072 * MiB,
    "memory budget of the one-pass path: its float32 logits chunks plus, for bf16/fp16 weights, the "
    "float32 [V, H] dW accumulator (`one_pass.plan` counts both; a budget that cannot hold the "
    "accumulator and 256-row chunks is refused); `one_pass.set_one_pass_bytes` overrides it; unset: "
    "3 GiB on CUDA, 128 MiB on other devices")
ONE_PASS_DW = Setting(
    "UPG_KERNELS_ONE_PASS_DW", "choice", "fp32",
    "how the one-pass path accumulates dW of bf16/fp16 weights: `fp32` (a float32 [V, H] accumulator "
    "inside the budget, one rounding at the end), `compensated` (the gradient plus a bf16 [V, H] "
    "remainder, half the memory, as exact as float32, more traffic per chunk) or `per_chunk` (into "
    "the gradient itself, no extra memory, one rounding per chunk: the error grows with the number of "
    "chunks); docs/kernels.md section 1c. float32 weights always accumulate in their gradient",
    choices=("fp32", "compensated", "per_chunk"))
PATH = Setting(
    "UPG_KERNELS_PATH", "choice", "auto",
    "pins the path of every call (`path=None`): `two_pass`, `two_pass_gemm_forward` (Triton backends) "
    "or `one_pass` (losses with gradients); a path a call cannot take runs `two_pass`. `auto`: chosen "
    "by measurement (docs/kernels.md, \"Path selection\")",
    choices=("auto",) + PATH_NAMES)
DETERMINISTIC = Setting(
    "UPG_KERNELS_DETERMINISTIC", "bool", False,
    "pins the deterministic path (`two_pass` with the GEMM backward, no atomics; also on under "
    "`torch.use_deterministic_algorithms(True)`)")
AUTOTUNE = Setting(
    "UPG_KERNELS_AUTOTUNE", "choice", "auto",
    "how unpinned calls choose their path (and dz tile): `measure` (time each eligible path once per "
    "key; off CUDA on a row sample), `model` (the flop rule: `one_pass` where eligible from N·V >= 2^24, "
    "the default tile), `auto` (measure on CUDA and, for the torch backend, on the CPU from "
    "N·H·V >= 2^27; model elsewhere)",
    choices=("auto", "measure", "model"))
CACHE_DIR = Setting(
    "UPG_KERNELS_CACHE_DIR", "text", None,
    "directory of the path-selection cache `paths.json` (default `~/.cache/upg_kernels`; the test "
    "suite's conftest.py points it at a temporary directory)")
PATH_TABLE = Setting(
    "UPG_KERNELS_PATH_TABLE", "text", None,
    "a path table written by `python -m upg_kernels.tune` to load before measuring (its entries win)")
TRITON_INTERPRET = Setting(
    "TRITON_INTERPRET", "bool", False,
    "triton's own variable: run the Triton kernels in the CPU interpreter (set before triton is "
    "imported; the test suite's conftest.py sets it without CUDA)", scope="triton")
BENCH_GIT_COMMIT = Setting(
    "UPG_BENCH_GIT_COMMIT", "text", None,
    "the commit recorded in benchmark results when the tree has no `.git` (bench/gpu_run.sh)",
    scope="bench")

SETTINGS = (BACKEND, WORKSPACE_BYTES, TORCH_CHUNK_BYTES, CAST_SLAB_BYTES, TRITON_FORWARD, TRITON_FWD_CONFIG,
            TRITON_BWD_CONFIG, TRITON_DZ_CONFIG, TRITON_DW_SLAB_BYTES, FUSED_EPILOGUE, GRAD_IN_FORWARD,
            ONE_PASS_BYTES, ONE_PASS_DW, PATH, DETERMINISTIC, AUTOTUNE, CACHE_DIR, PATH_TABLE,
            TRITON_INTERPRET, BENCH_GIT_COMMIT)


def interpreter_on() -> bool:
    """Whether the Triton kernels run in the CPU interpreter (``TRITON_INTERPRET``)."""
    return bool(TRITON_INTERPRET.get())


def _default_text(s: Setting) -> str:
    if s.default is None:
        return "unset"
    if s.kind == "bool":
        return "1" if s.default else "0"
    if s.kind == "bytes":
        return f"{s.default} ({s.default // MiB} MiB)" if s.default % MiB == 0 else str(s.default)
    return str(s.default)


def markdown_table() -> str:
    """The table of docs/settings.md."""
    rows = ["| variable | kind | default | read by | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        kind = s.kind + (f" ({', '.join(s.choices)})" if s.choices else "")
        rows.append(f"| `{s.name}` | {kind} | {_default_text(s)} | {s.scope} | {s.meaning} |")
    return "\n".join(rows) + "\n"

