"""An allocation tracer: live and peak bytes of every tensor storage that torch ops create.

:class:`AllocTracer` is a ``TorchDispatchMode``. Each aten op's outputs are checked for storages it
has not seen (keyed by the ``StorageImpl``); their ``nbytes`` join the live total, and the peak is
updated. Before each op it drops the storages whose last reference has gone (a C++ weak reference
per storage, so a storage held only by autograd's saved tensors stays live). Frees are thus seen at
op boundaries, which is where allocations happen: the peak is exact for the ops' outputs.

It works on any device; on ``meta`` nothing is computed, so real shapes (tens of GB) trace in
milliseconds. Custom ops of the ``upg_kernels`` namespace are run through their Python
implementation (with the tracer active) instead of their fake/meta kernel, so their host code --
buffers, row compactions, launch planning -- is traced; the kernels themselves are skipped on meta
(``upg_kernels/kernels/meta.py``).

Not seen: memory allocated outside torch ops (cuBLAS / Triton workspaces, the CUDA caching
allocator's rounding and fragmentation), and scratch memory inside one aten kernel.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

TRACED_NAMESPACES = ("upg_kernels",)


def _real_impl(func):
    """The Python implementation of a custom op of a traced namespace, else None."""
    ns = getattr(func, "namespace", None)
    if ns not in TRACED_NAMESPACES:
        return None
    from torch._library.custom_ops import OPDEFS
    opdef = OPDEFS.get(f"{ns}::{func._opname}")
    return None if opdef is None else opdef._init_fn


class AllocTracer(TorchDispatchMode):
    """``with AllocTracer() as t: ...`` then ``t.peak`` / ``t.live`` (bytes) and ``t.events``."""

    def __init__(self, record: bool = False, meta_scalar=None):
        super().__init__()
        # ``.item()`` / ``bool()`` of a meta tensor has no value; when set, this one is returned
        # (a per-implementation answer the caller has checked, see bench/memory_model.py)
        self.meta_scalar = meta_scalar
        self.live = 0
        self.peak = 0
        self._storages: dict[int, tuple[int, int]] = {}   # StorageImpl address -> (weak ref, nbytes)
        self.record = record
        self.events: list[tuple[str, int, int]] = []      # (op, +/- bytes, live after)
        self._timeline: list[tuple[int, int]] = []         # (StorageImpl address, +/- bytes)

    # ------------------------------------------------------------------ bookkeeping
    def sweep(self) -> None:
        """Forget the storages whose last reference is gone."""
        for key, (ref, nbytes) in list(self._storages.items()):
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(ref)
                del self._storages[key]
                self.live -= nbytes
                self._timeline.append((key, -nbytes))
                if self.record:
                    self.events.append(("free", -nbytes, self.live))

    def _track(self, out, op_name: str, inputs) -> None:
        # views and in-place results share an input's storage: not an allocation
        seen = {t.untyped_storage()._cdata for t in tree_flatten(inputs)[0]
                if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._storages or key in seen:
                continue
            nbytes = st.nbytes()
            self._storages[key] = (st._weak_ref(), nbytes)
            self.live += nbytes
            self._timeline.append((key, nbytes))
            self.peak = max(self.peak, self.live)
            if self.record:
                self.events.append((op_name, nbytes, self.live))

    def peak_without(self, tensors) -> int:
        """The peak over the trace of live bytes minus those of ``tensors``' storages (still live
        now) at the times they were live: a storage that becomes an output (a gradient) is not
        counted from its allocation on, and is counted nowhere before it existed."""
        keys = {t.untyped_storage()._cdata for t in tensors}
        final = {}                                   # key -> index of its allocation live now
        for i, (key, nb) in enumerate(self._timeline):
            if key in keys:
                if nb > 0:
                    final[key] = i
                else:
                    final.pop(key, None)
        starts = set(final.values())
        live = peak = 0
        for i, (key, nb) in enumerate(self._timeline):
            if i in starts:
                continue                             # never freed: no matching -nb follows
            live += nb
            peak = max(peak, live)
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.sweep()
        if (func is torch.ops.aten._local_scalar_dense.default and self.meta_scalar is not None
                and args[0].device.type == "meta"):
            return self.meta_scalar
        impl = _real_impl(func)
        if impl is not None:
            with self:                     # trace the ops inside the custom op's host code
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self._track(out, str(func), (args, kwargs))
        return out

    def __exit__(self, *exc):
        self.sweep()
        return super().__exit__(*exc)
