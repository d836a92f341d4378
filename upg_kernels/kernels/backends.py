"""The backend table: one row per backend of :func:`upg_kernels.token_logprobs` (the one owner of the
backend names and of what each backend can do).

A row names its functions as ``"module:function"`` strings under :mod:`upg_kernels.kernels`, imported
on first use: the Triton rows need the triton package, and this module must import without it. Backend
modules import the contract (:mod:`.contract`), never this table, so the lazy imports have no cycle.

Adding a backend: one module with ``forward`` / ``backward`` (the contract, ``contract.py``) and one
row below (CONTRIBUTING.md, "Adding a backend"). Everything else (``backend=`` validation, ``"auto"``,
the fused-epilogue and device checks, the bench adapters and the memory model's paths) reads the row.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

from .. import settings


@dataclass(frozen=True)
class ForwardPath:
    """One way to compute the forward (``logp, entropy, lse``) of a backend."""
    name: str
    fn: str              # "module:function" under upg_kernels.kernels
    summary: str
    short: str           # bench label: ``ours-<short>`` (impls), ``ours-<backend>-<short>`` (memory model)


FORWARD_PATHS = {p.name: p for p in (
    ForwardPath("fused", "triton_logprobs_fwd:forward",
                "one Triton kernel: logits tiles on chip, online statistics, split partials combined "
                "by torch ops", "fusedfwd"),
    ForwardPath("gemm", "triton_gemm_fwd:forward",
                "cuBLAS float32 logits slabs in the workspace + a Triton row kernel for the statistics",
                "gemmfwd"),
    ForwardPath("chunked", "torch_chunked:forward",
                "PyTorch: chunks of rows x the whole vocabulary within UPG_KERNELS_TORCH_CHUNK_BYTES",
                "chunkedfwd"),
)}


@dataclass(frozen=True)
class Backend:
    """A row of the backend table.

    ``forwards``: the names of its forward paths (:data:`FORWARD_PATHS`), the first the default; with
    more than one, ``UPG_KERNELS_TRITON_FORWARD`` picks. ``bwd``: its backward (``"module:function"``).
    ``partials``: the forward's split partials ``(part [4, splits, M], rows [M])`` that the fused loss
    epilogue combines (None: no fused epilogue). ``deterministic``: bitwise-reproducible gradients run
    to run. ``triton``: needs the triton package and CUDA tensors (on the CPU only under
    ``TRITON_INTERPRET=1``; ``meta`` tensors plan without launching). ``float64``: takes float64
    inputs. ``auto_on``: the device types where ``backend="auto"`` picks it (first row in table order
    wins; ``"*"``: any device). ``short``: its bench label (``ours-<short>``). ``dz_kernel``: its
    backward launches the dz kernel (``triton_dz.py``) whose tile the path selection times."""
    name: str
    summary: str
    forwards: tuple[str, ...]
    bwd: str
    partials: str | None = None
    deterministic: bool = True
    triton: bool = False
    float64: bool = False
    auto_on: tuple[str, ...] = ()
    short: str = ""
    dz_kernel: bool = False

    @property
    def fused_epilogue(self) -> bool:
        """Whether the fused Triton loss epilogue can run on this backend's forward partials."""
        return self.partials is not None

    def forward_path(self, name: str | None = None) -> ForwardPath:
        """The forward path ``name``, or the one the settings choose (the default when there is no
        choice)."""
        if name is None:
            name = settings.TRITON_FORWARD.get() if len(self.forwards) > 1 else self.forwards[0]
        if name not in self.forwards:
            raise ValueError(f"backend {self.name!r} has no forward path {name!r}; it has {self.forwards}")
        return FORWARD_PATHS[name]

    def forward(self, hidden, weight, bias, targets, p, *, path: str | None = None):
        """The contract's forward, by the forward path ``path`` (None: :meth:`forward_path`'s)."""
        return load(self.forward_path(path).fn)(hidden, weight, bias, targets, p)

    def backward(self, hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
                 need_hidden=True, need_weight=True, need_bias=True, g_lse=None):
        """The contract's backward."""
        return load(self.bwd)(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
                              need_hidden, need_weight, need_bias, g_lse=g_lse)

    def forward_partials(self, hidden, weight, bias, targets, p):
        """``(part, rows)`` for the fused epilogue (backends with ``partials`` only)."""
        if self.partials is None:
            raise ValueError(f"backend {self.name!r} has no forward partials (no fused epilogue)")
        return load(self.partials)(hidden, weight, bias, targets, p)


# The table. Order matters for "auto" (the first row whose auto_on matches wins).
BACKENDS = {b.name: b for b in (
    Backend("triton", "the fused Triton forward; the GEMM backward (a Triton kernel writes dz blocks "
            "into a bounded workspace, dh and dW are cuBLAS GEMMs; no atomics). The CUDA default. "
            "With filter_eps > 0 it runs the atomic backward (tile filtering is a per-tile skip)",
            forwards=("fused", "gemm"), bwd="gemm_backward:backward",
            partials="triton_logprobs_fwd:forward_partials", deterministic=True, triton=True,
            auto_on=("cuda",), short="triton", dz_kernel=True),
    Backend("triton_atomic", "the same forward; a single-kernel backward that adds every tile's "
            "products to dh / dW with float32 atomics",
            forwards=("fused", "gemm"), bwd="triton_logprobs_bwd:backward",
            partials="triton_logprobs_fwd:forward_partials", deterministic=False, triton=True,
            short="atomic"),
    Backend("torch", "chunked pure PyTorch: any device, float64 too. The CPU default",
            forwards=("chunked",), bwd="torch_chunked:backward", deterministic=True, float64=True,
            auto_on=("*",), short="torch"),
)}

BACKEND_NAMES = tuple(BACKENDS)
AUTO = "auto"
BACKEND_CHOICES = (AUTO,) + BACKEND_NAMES     # what ``backend=`` accepts


# Every module holding @triton.jit kernels, each with an ``aot_variants()`` (kernels/aot.py): the
# ahead-of-time compile check (python -m upg_kernels.aot_check) builds all of them. A module listed
# here that fails to import, or lacks aot_variants(), is an error of the check, never skipped.
TRITON_KERNEL_MODULES = (
    "triton_logprobs_fwd",     # the fused forward (forward path "fused")
    "triton_logprobs_bwd",     # the atomic backward (backend "triton_atomic")
    "triton_dz",               # the GEMM backward's dz blocks (backend "triton")
    "triton_gemm_fwd",         # the GEMM-tiled forward's row kernel (forward path "gemm")
    "triton_epilogue",         # the fused loss epilogue
    "triton_onepass",          # the one-pass path's row kernels (stats, dz in place)
)


def load(ref: str):
    """The function ``"module:function"`` under upg_kernels.kernels (imported on first use; looked up
    on every call, so a test may monkeypatch the module attribute)."""
    module, fn = ref.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


def with_forward(name: str, forward: str | None, dz_tile: str | None = None) -> str:
    """The backend string the custom ops carry: ``name``, or ``"name:forward"`` to run the forward
    path ``forward`` (the path ``two_pass_gemm_forward``, kernels/paths.py), with ``"@tile"`` appended
    when the path selection chose the dz tile ``dz_tile`` (the backward runs in
    ``triton_dz.dz_tile_scope(dz_tile)``)."""
    spec = name if forward is None else f"{name}:{forward}"
    return spec if dz_tile is None else f"{spec}@{dz_tile}"


def split_backend(spec: str) -> tuple[Backend, str | None]:
    """``(row, forward path or None)`` of a backend string of :func:`with_forward`."""
    spec = spec.partition("@")[0] if isinstance(spec, str) else spec
    name, _, fwd = spec.partition(":") if isinstance(spec, str) else (spec, "", "")
    return get_backend(name), (fwd or None)


def dz_tile_of(spec: str) -> str | None:
    """The dz tile of a backend string of :func:`with_forward` (None: none chosen)."""
    return (spec.partition("@")[2] or None) if isinstance(spec, str) else None


def get_backend(name: str) -> Backend:
    """The table row of backend ``name`` (a ``"name:forward[@tile]"`` string names its row)."""
    if isinstance(name, str) and (":" in name or "@" in name):
        name = name.partition("@")[0].partition(":")[0]
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}") from None


def triton_available() -> bool:
    """Whether the triton package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def auto_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend ``"auto"`` means for a call on ``device`` computing in ``dtype``: the first row
    whose ``auto_on`` names the device type, that takes the dtype and whose needs are met."""
    for b in BACKENDS.values():
        if (device.type in b.auto_on or "*" in b.auto_on) \
                and (dtype != torch.float64 or b.float64) and (not b.triton or triton_available()):
            return b.name
    raise AssertionError("the backend table has no row for every device")   # the torch row has "*"
