"""``impl_backend=upg``: verl's actor and reference forward passes get their log-probs and entropy from
:func:`upg_kernels.token_logprobs` (forward and backward).

How verl 0.9.1 wires its fused kernels (read in ``verl/models/transformers/monkey_patch.py``,
``dense_common.py`` and ``verl/workers/engine/fsdp/transformer_impl.py``): with
``model.use_fused_kernels=True`` the FSDP engine calls ``apply_monkey_patch(..., fused_kernels_backend=
model.fused_kernel_options.impl_backend)``, which ends in ``patch_forward_with_backends``. That function
knows ``torch``, ``triton`` and ``liger`` and skips any other name. Its ``triton`` choice replaces the model
class's ``forward`` by ``forward_with_triton_backend``, which runs the backbone and calls
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature, "none")
-> (log_probs, entropy)`` (flat ``[N]`` outputs), looked up in that module at every call.

:func:`install` therefore

1. wraps ``patch_forward_with_backends`` so that ``"upg"`` is accepted: the model gets verl's own
   triton-backend forward (backbone, label roll, output class: verl's code), wrapped so that while it runs,
   the vocab-sized call goes to us;
2. puts a dispatcher at ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` that calls
   :func:`verl_linear_cross_entropy` inside an ``upg`` model's forward and verl's own kernel everywhere
   else (models on verl's ``triton`` backend are untouched);
3. wraps ``FSDPEngineWithLMHead.forward_step`` so that ``calculate_entropy=False`` micro-batches (the
   reference model, and the actor when ``entropy_coeff`` is 0 and no entropy metric is asked) skip the
   entropy: verl's forward always computes it, ours only when the engine will read it;
4. for the Megatron engine (``verl/workers/engine/megatron/transformer_impl.py``), which has no backend
   choice of its own: with ``use_fused_kernels=True`` it always calls ``linear_cross_entropy`` from the
   module globals of ``verl.models.mcore.model_forward_fused`` (and ``model_forward_1f1b_overlap``), with
   the vocabulary-parallel lm_head shard and ``dist_process_group=`` the tensor-parallel group (after
   gathering the sequence-parallel hidden states). :func:`install_kernel` wraps
   ``MegatronEngine._maybe_enable_fused_kernels`` so that an engine whose
   ``model.fused_kernel_options.impl_backend`` is ``upg`` routes those module globals to
   :func:`verl_linear_cross_entropy` (process-wide; only when megatron-core is installed).

Tensor parallelism (``dist_process_group`` given): verl's kernel contract is rank-ordered equal shards (rank
r holds rows ``[r * V_local, (r + 1) * V_local)``, Megatron pads the vocabulary so) and a PARTIAL hidden
gradient (Megatron's ``gather_from_sequence_parallel_region`` sums it in its backward). We honour both:
:class:`upg_kernels.VocabParallelOptions` with those rows (the tiling is checked once per group) and
``reduce_hidden_grad=False``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util

from ...logprobs import token_logprobs
from ...parallel.vocab import VocabParallelOptions

__all__ = ["UPG_BACKEND", "verl_linear_cross_entropy", "install_kernel", "verl_tp_options",
           "route_megatron_fused", "wrap_megatron_engine", "MEGATRON_FUSED_MODULES"]

UPG_BACKEND = "upg"
_IN_UPG_FORWARD = contextvars.ContextVar("upg_kernels_verl_forward", default=False)
_WANT_ENTROPY = contextvars.ContextVar("upg_kernels_verl_entropy", default=None)  # None: not known -> compute
_state = {}


def verl_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None,
                              *, backend="auto"):
    """verl's ``linear_cross_entropy`` contract on :func:`upg_kernels.token_logprobs`.

    ``hidden [..., H]``, ``weight [V, H]``, ``labels [...]`` -> ``(log_probs [N], entropy [N])`` (flat, float32),
    ``N`` the number of labels. Only ``reduction="none"``. ``dist_process_group``: the tensor-parallel group
    of a vocabulary-parallel ``weight`` (this rank's rows, verl's equal rank-ordered shards; ``labels`` are
    global ids); the outputs are then those of the full vocabulary and the hidden gradient is this rank's
    partial one, as verl's kernel returns it (module docstring). ``entropy`` is ``None`` when the engine
    marked the micro-batch ``calculate_entropy=False``.
    """
    if reduction != "none":
        raise ValueError(f"upg backend: reduction must be 'none' (per-token outputs), got {reduction!r}")
    want_entropy = _WANT_ENTROPY.get() is not False
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1)
    vp = None if dist_process_group is None else verl_tp_options(dist_process_group, weight.shape[0])
    out = token_logprobs(h, weight, t, temperature=float(temperature), return_entropy=want_entropy,
                         backend=backend, vocab_parallel=vp)
    return out if want_entropy else (out, None)


_TP_OPTIONS: dict = {}


def verl_tp_options(group, local_vocab: int) -> VocabParallelOptions:
    """verl's vocabulary-parallel contract as :class:`VocabParallelOptions`: rank r of ``group`` holds rows
    ``[r * local_vocab, (r + 1) * local_vocab)``; partial hidden gradient (``reduce_hidden_grad=False``).
    One object per (group, local size), so the tiling check (one all-gather) runs once."""
    import torch.distributed as dist
    key = (group, int(local_vocab))
    if key not in _TP_OPTIONS:
        r = dist.get_rank(group)
        _TP_OPTIONS[key] = VocabParallelOptions(r * local_vocab, (r + 1) * local_vocab, group,
                                                reduce_hidden_grad=False)
    return _TP_OPTIONS[key]


# verl modules whose module-global ``linear_cross_entropy`` the Megatron engine's fused forward calls
MEGATRON_FUSED_MODULES = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def _upg_lce(original):
    @functools.wraps(original)
    def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        return verl_linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)

    linear_cross_entropy._upg_original = original
    return linear_cross_entropy


def route_megatron_fused(modules=MEGATRON_FUSED_MODULES):
    """Point the Megatron fused forward's ``linear_cross_entropy`` (a module global of each of ``modules``)
    at :func:`verl_linear_cross_entropy` (idempotent; a module that does not import is skipped)."""
    done = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(mod, "linear_cross_entropy", None)
        if fn is not None and not hasattr(fn, "_upg_original"):
            mod.linear_cross_entropy = _upg_lce(fn)
        done.append(name)
    return done


def wrap_megatron_engine(engine_cls):
    """Wrap ``engine_cls._maybe_enable_fused_kernels`` (verl's ``MegatronEngine``): after verl enables its
    fused forward, an engine whose ``model_config.fused_kernel_options["impl_backend"]`` is ``upg`` routes
    the fused forward's kernel to us (:func:`route_megatron_fused`)."""
    original = engine_cls._maybe_enable_fused_kernels
    if hasattr(original, "_upg_original"):
        return

    @functools.wraps(original)
    def _maybe_enable_fused_kernels(self):
        original(self)
        opts = getattr(self.model_config, "fused_kernel_options", None) or {}
        if self.engine_config.use_fused_kernels and opts.get("impl_backend") == UPG_BACKEND:
            route_megatron_fused()
            print("Using upg-kernels backend for the Megatron engine's fused kernels")

    _maybe_enable_fused_kernels._upg_original = original
    engine_cls._maybe_enable_fused_kernels = _maybe_enable_fused_kernels


def _install_megatron():
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return      # no megatron-core: verl's Megatron engine cannot run here
    try:
        from verl.workers.engine.megatron.transformer_impl import MegatronEngine
    except ImportError:
        return
    wrap_megatron_engine(MegatronEngine)


def _dispatching_lce(original):
    @functools.wraps(original)
    def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        if _IN_UPG_FORWARD.get():
            return verl_linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)
        return original(hidden, weight, labels, temperature, reduction, dist_process_group)

    linear_cross_entropy._upg_original = original
    return linear_cross_entropy


def _upg_forward(triton_forward):
    @functools.wraps(triton_forward)
    def forward(self, *args, **kwargs):
        token = _IN_UPG_FORWARD.set(True)
        try:
            return triton_forward(self, *args, **kwargs)
        finally:
            _IN_UPG_FORWARD.reset(token)

    forward._upg_wrapped = triton_forward
    return forward


def _patching(original):
    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not (use_fused_kernels and fused_kernels_backend == UPG_BACKEND):
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        cls = model.__class__
        base = getattr(cls.forward, "_upg_wrapped", None)
        if base is None:
            original(model, use_fused_kernels=True, fused_kernels_backend="triton")  # verl's triton forward
            base = cls.forward
        cls.forward = _upg_forward(base)
        model._verl_fused_kernels_backend = UPG_BACKEND
        _wrap_engine_forward_step()
        print(f"Using upg-kernels backend for fused kernels in {cls.__name__}")

    patch_forward_with_backends._upg_original = original
    return patch_forward_with_backends


@contextlib.contextmanager
def entropy_wanted(flag):
    """Within this block the upg backend computes the entropy only if ``flag`` (None: always)."""
    token = _WANT_ENTROPY.set(flag)
    try:
        yield
    finally:
        _WANT_ENTROPY.reset(token)


def _wrap_engine_forward_step():
    """Tell the kernel whether the FSDP engine will read the entropy of this micro-batch."""
    if _state.get("forward_step"):
        return
    try:
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    except ImportError:  # another engine: the entropy is always computed
        return
    original = FSDPEngineWithLMHead.forward_step

    @functools.wraps(original)
    def forward_step(self, micro_batch, loss_function, forward_only):
        want = bool(tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False))
        with entropy_wanted(want):
            return original(self, micro_batch, loss_function, forward_only)

    forward_step._upg_original = original
    FSDPEngineWithLMHead.forward_step = forward_step
    _state["forward_step"] = (FSDPEngineWithLMHead, original)


def install_kernel():
    """Make ``fused_kernel_options.impl_backend=upg`` a verl backend (idempotent)."""
    if _state.get("kernel"):
        return
    import verl.models.transformers.monkey_patch as mp
    import verl.utils.kernel.linear_cross_entropy as lce_mod

    if not hasattr(mp.patch_forward_with_backends, "_upg_original"):
        mp.patch_forward_with_backends = _patching(mp.patch_forward_with_backends)
    if not hasattr(lce_mod.linear_cross_entropy, "_upg_original"):
        lce_mod.linear_cross_entropy = _dispatching_lce(lce_mod.linear_cross_entropy)
    _install_megatron()
    _state["kernel"] = True
