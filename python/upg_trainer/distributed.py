"""Multi-process training helpers: torchrun initialisation, DDP / FSDP2 wrapping, collectives,
full state dicts, and the one rule the fused loss needs under FSDP2.

Everything here is a no-op (or the obvious single-process answer) when the process was not
started by ``torchrun``: ``world_size() == 1``, ``rank() == 0``, ``barrier()`` does nothing,
``wrap_model(model, "none")`` returns the model itself.

The fused-loss rule (read this before touching the training step)
-----------------------------------------------------------------
The trainer never asks the model for its full logits: it runs the decoder to get the last
hidden states and hands them, with the lm_head weight, to ``upg_kernels`` (``token_logprobs`` /
``unified_policy_loss``). Under FSDP2 the lm_head weight registered on the module is a *sharded
DTensor* (each rank holds ``V / world_size`` rows) except while its FSDP unit is inside its
forward: the unit's pre-forward hook all-gathers the parameters and swaps the plain, unsharded
tensors onto the modules; the post-backward hook reduce-scatters their gradients back onto the
shards. Reading ``model.lm_head.weight`` outside that window gives the wrong object (and the
kernel would see a DTensor).

The approach used here: :func:`wrap_model` puts the causal LM inside a tiny root module
(:class:`ForwardCall`) whose ``forward(fn, *args, **kwargs)`` just returns
``fn(lm, *args, **kwargs)``. Under FSDP2 that root module is the root FSDP unit and owns every
parameter not in a decoder layer (embeddings, final norm, lm_head, tied or not), so *inside*
``fn`` the lm_head weight is the full, unsharded tensor and autograd routes its gradient through
FSDP's reduce-scatter; decoder layers are their own units and gather themselves as they run.
Under DDP the same root module is what DDP wraps, so the call goes through ``DDP.forward`` and the
gradient all-reduce is armed. The trainer therefore writes its step as::

    def step_loss(lm, batch):
        hidden = lm.model(input_ids=..., attention_mask=...).last_hidden_state   # decoder only
        weight, bias = output_weight(lm)            # full tensors here, whatever the strategy
        logp = upg_kernels.token_logprobs(hidden, weight, targets, bias=bias)
        return loss                                 # a tensor (or tuple / dict of tensors)

    loss = forward_call(wrapped, step_loss, batch)  # same call for none / ddp / fsdp2
    loss.backward()

``fn`` must return tensors (a tensor, or tuple / list / dict of tensors): FSDP registers its
backward hooks on the returned tensors. The root unit is created with
``reshard_after_forward=False`` so the unsharded lm_head (and embeddings) stay alive until the
backward pass, which needs them.

Generation under FSDP2 goes through :func:`generate` for the same reason (it also passes
``synced_gpus=True`` so ranks whose sequences finish early keep joining the layer all-gathers).
vLLM weight pushes use :func:`iter_full_params`, which gathers one parameter at a time.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "init_distributed", "is_distributed", "world_size", "rank", "local_rank", "is_main", "device",
    "barrier", "all_reduce_mean", "all_reduce_sum", "all_gather_object", "broadcast_object",
    "STRATEGIES", "ForwardCall", "wrap_model", "unwrap_model", "forward_call", "output_weight",
    "generate", "no_sync", "shard_batch", "full_state_dict", "load_full_state_dict",
    "full_optimizer_state_dict", "load_full_optimizer_state_dict", "iter_full_params",
    "save_full_state_dict", "cleanup",
]

STRATEGIES = ("none", "ddp", "fsdp2")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ----------------------------------------------------------------------------- process group
def _launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS) and int(os.environ.get("WORLD_SIZE", "1")) >= 1


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    ``backend`` defaults to ``nccl`` when CUDA is available, ``gloo`` otherwise. Without torchrun
    (no ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) this does nothing. On CUDA it also
    selects ``cuda:LOCAL_RANK`` as the current device. Safe to call twice.

    Returns True when a process group is (now) initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not _launched_by_torchrun() or not dist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed: backend 'nccl' needs CUDA; use backend='gloo' on CPU")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(**kwargs)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def local_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce(value, op, mean: bool):
    is_tensor = isinstance(value, torch.Tensor)
    if not is_distributed():
        return value.clone() if is_tensor else float(value)
    # NCCL reduces CUDA tensors only: CPU inputs travel to this rank's GPU and back
    comm_dev = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    if is_tensor:
        home = value.device
        t = value.detach().to(comm_dev, copy=True)
    else:
        home = None
        t = torch.tensor(float(value), dtype=torch.float64, device=comm_dev)
    orig_dtype = t.dtype
    if not t.is_floating_point():
        t = t.to(torch.float64)
    dist.all_reduce(t, op=op)
    if mean:
        t = t / dist.get_world_size()
    if is_tensor:
        # integer input: the sum keeps its dtype, the mean is a float64 tensor
        t = t.to(orig_dtype) if (not mean and not orig_dtype.is_floating_point) else t
        return t.to(home)
    return float(t.item())


def all_reduce_mean(value):
    """Mean over ranks of a tensor (returns a new, detached tensor) or a Python number (returns float)."""
    return _reduce(value, dist.ReduceOp.SUM if is_distributed() else None, mean=True)


def all_reduce_sum(value):
    """Sum over ranks of a tensor (new, detached) or a Python number (float)."""
    return _reduce(value, dist.ReduceOp.SUM if is_distributed() else None, mean=False)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` single-process). Objects must be picklable."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_batch(items: Sequence[Any]) -> list[Any]:
    """This rank's contiguous slice of ``items`` (sizes differ by at most one; rank r gets the r-th block).

    With uneven slices a per-rank mean is not the full-batch mean: normalise losses by a global
    count (``all_reduce_sum``) instead, see docs/distributed.md.
    """
    items = list(items)
    ws, r = world_size(), rank()
    if ws == 1:
        return items
    base, extra = divmod(len(items), ws)
    start = r * base + min(r, extra)
    stop = start + base + (1 if r < extra else 0)
    return items[start:stop]


# ----------------------------------------------------------------------------- wrapping
class ForwardCall(nn.Module):
    """Root module whose forward runs an arbitrary function on the wrapped LM.

    ``ForwardCall(lm)(fn, *a, **k) == fn(lm, *a, **k)``, but executed inside this module's forward,
    i.e. inside DDP's / FSDP2's forward hooks (see the module docstring).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args, **kwargs):  # noqa: D401
        return fn(self.module, *args, **kwargs)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (transformers) causal LM, for per-layer FSDP units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    # Fallback: the longest ModuleList of identical blocks.
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(x) for x in m}) == 1:
            best = list(m)
    return best


def wrap_model(model: nn.Module, strategy: str = "none", *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, find_unused_parameters: bool = False,
               activation_checkpointing: bool = False) -> nn.Module:
    """Wrap ``model`` for data-parallel training.

    - ``none``: returns ``model`` unchanged (``forward_call`` then calls ``fn(model, ...)`` directly).
    - ``ddp``: ``DistributedDataParallel(ForwardCall(model))`` (``device_ids=[local_rank]`` on CUDA).
    - ``fsdp2``: ``fully_shard`` on every decoder layer (found through ``model._no_split_modules``,
      else the longest ``ModuleList`` of identical blocks), then on ``ForwardCall(model)`` as the root
      unit with ``reshard_after_forward=False``. ``param_dtype`` / ``reduce_dtype`` build a
      ``MixedPrecisionPolicy`` (e.g. bf16 params, fp32 gradient reduction).

    ``activation_checkpointing``: recompute each decoder layer in backward (transformers'
    ``gradient_checkpointing_enable`` with non-reentrant checkpointing), for long sequences; works with
    every strategy (it is applied before wrapping).

    ``ddp``/``fsdp2`` need an initialised process group (``init_distributed``); at world size 1 they
    still wrap (useful for testing) as long as a group exists. Move the model to its device first.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; expected one of {STRATEGIES}")
    if activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                             "activation checkpointing needs a transformers model")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # no KV cache while training with recomputation
    if strategy == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"wrap_model(strategy={strategy!r}) needs a process group: launch with torchrun "
                           "and call upg_trainer.distributed.init_distributed() first")
    root = ForwardCall(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = next(model.parameters()).device
        ids = [dev.index if dev.index is not None else local_rank()] if dev.type == "cuda" else None
        return DDP(root, device_ids=ids, find_unused_parameters=find_unused_parameters)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dev_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(dev_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError("wrap_model(strategy='fsdp2'): found no decoder layers to shard in "
                         f"{type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return root


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM inside whatever ``wrap_model`` returned (identity for ``none``).

    Under FSDP2 its parameters are sharded DTensors outside ``forward_call``: use
    :func:`generate`, :func:`full_state_dict` or :func:`iter_full_params` rather than calling it.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP):
        model = model.module
    if isinstance(model, ForwardCall):
        model = model.module
    return model


def _strategy_of(model: nn.Module) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP):
        return "ddp"
    if isinstance(model, ForwardCall):
        from torch.distributed.fsdp import FSDPModule
        return "fsdp2" if isinstance(model, FSDPModule) else "none"
    return "none"


def forward_call(model: nn.Module, fn: Callable[..., Any], *args, **kwargs):
    """Run ``fn(lm, *args, **kwargs)`` inside the wrapper's forward (``lm = unwrap_model(model)``).

    This is how the trainer computes its loss from hidden states and the lm_head weight under every
    strategy: under FSDP2 the root unit's parameters (embeddings, norm, lm_head) are unsharded while
    ``fn`` runs; under DDP gradient synchronisation is armed. ``fn`` should return tensors.
    """
    if isinstance(model, ForwardCall) or _strategy_of(model) == "ddp":
        return model(fn, *args, **kwargs)
    return fn(model, *args, **kwargs)


def output_weight(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of ``lm``'s output embedding, for the fused loss.

    Call it inside ``forward_call`` (or on an unwrapped / DDP model). Raises when the weight is still a
    sharded DTensor, i.e. when called on an FSDP2 model outside ``forward_call``.
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding (lm_head); the fused loss needs one")
    weight = head.weight
    bias = getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    if isinstance(weight, DTensor) or isinstance(bias, DTensor):
        raise RuntimeError("output_weight: the lm_head weight is a sharded DTensor; under FSDP2 read it inside "
                           "upg_trainer.distributed.forward_call(model, fn, ...) where it is unsharded")
    return weight, bias


def generate(model: nn.Module, **generate_kwargs):
    """``lm.generate(**generate_kwargs)`` that works under every strategy (no grad).

    Under FSDP2 it runs inside the root forward and sets ``synced_gpus=True`` at world size > 1 so all
    ranks keep stepping (and all-gathering layers) until every rank's sequences are done.
    """
    strategy = _strategy_of(model)
    if strategy == "fsdp2" and world_size() > 1:
        generate_kwargs.setdefault("synced_gpus", True)

    def _gen(lm, **kw):
        return lm.generate(**kw)

    with torch.no_grad():
        if strategy == "fsdp2":
            return model(_gen, **generate_kwargs)
        return unwrap_model(model).generate(**generate_kwargs)


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True):
    """Skip gradient synchronisation (gradient accumulation micro-steps before the last one).

    DDP: ``model.no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` (gradients stay unsharded
    and accumulate; the last micro-step, outside this context, reduce-scatters them).
    """
    strategy = _strategy_of(model)
    if not enabled or strategy == "none":
        yield
        return
    if strategy == "ddp":
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------- state dicts
def _full_options(cpu_offload: bool = True, broadcast_from_rank0: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload,
                            broadcast_from_rank0=broadcast_from_rank0)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LM's full (unsharded) state dict on CPU, keyed like ``unwrap_model(model).state_dict()``.

    Collective under FSDP2: every rank must call it. Rank 0 gets the tensors; under FSDP2 the other
    ranks get an empty dict (``cpu_offload`` keeps only rank 0's copy). Under ``none``/``ddp`` every
    rank gets the tensors (they are identical).
    """
    lm = unwrap_model(model)
    if _strategy_of(model) != "fsdp2":
        return {k: v.detach().cpu() for k, v in lm.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(lm, options=_full_options(cpu_offload=True))
    # keep tied parameters tied (e.g. lm_head.weight is embed_tokens.weight), as lm.state_dict() does,
    # so save_pretrained recognises the tie instead of writing two copies
    first: dict[int, str] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in first and name in sd and first[id(p)] in sd:
            sd[name] = sd[first[id(p)]]
        first.setdefault(id(p), name)
    return sd


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Load a full state dict into the wrapped LM: rank 0's copy is used and broadcast; under DDP/FSDP2 the
    other ranks may pass ``None``. Collective under DDP/FSDP2."""
    lm = unwrap_model(model)
    strategy = _strategy_of(model)
    if strategy == "ddp" and is_distributed():
        # rank 0 loads, then every state tensor is broadcast (other ranks may pass None)
        if rank() == 0:
            lm.load_state_dict(state_dict)
        with torch.no_grad():
            for t in lm.state_dict().values():
                dist.broadcast(t, src=0)
        return
    if strategy != "fsdp2":
        if state_dict is None:
            raise ValueError("load_full_state_dict: state_dict is None")
        lm.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    # a shallow copy: with broadcast_from_rank0 torch replaces the dict's values in place
    set_model_state_dict(lm, dict(state_dict) if rank() == 0 else {},
                         options=_full_options(cpu_offload=False, broadcast_from_rank0=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict, keyed by parameter names (the same format under every strategy,
    so a checkpoint written under one strategy resumes under another). Collective under DDP/FSDP2;
    under FSDP2 only rank 0 receives the tensors (the others get empty states)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap_model(model), optimizer, options=_full_options(cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state_dict: dict[str, Any] | None) -> None:
    """Load a ``full_optimizer_state_dict`` (rank 0's copy is used and broadcast under DDP/FSDP2; the other
    ranks may pass None). A plain ``optimizer.state_dict()`` (integer parameter ids) is accepted too,
    except under FSDP2."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    strategy = _strategy_of(model)
    if rank() == 0 or not is_distributed():
        if state_dict is None:
            raise ValueError("load_full_optimizer_state_dict: state_dict is None")
        legacy = any(isinstance(k, int) for k in state_dict.get("state", {})) or \
            any(isinstance(p, int) for g in state_dict.get("param_groups", []) for p in g.get("params", []))
    else:
        legacy = False
    legacy = bool(broadcast_object(legacy))
    if legacy:
        if strategy == "fsdp2":
            raise ValueError("this optimizer state uses integer parameter ids (optimizer.state_dict()); "
                             "under FSDP2 it must be keyed by parameter names (full_optimizer_state_dict)")
        optimizer.load_state_dict(broadcast_object(state_dict) if is_distributed() else state_dict)
        return
    distributed = is_distributed() and strategy != "none"
    sd = dict(state_dict) if (rank() == 0 or not distributed) else {}
    set_optimizer_state_dict(unwrap_model(model), optimizer, sd,
                             options=_full_options(cpu_offload=False, broadcast_from_rank0=distributed))


def iter_full_params(model: nn.Module, aliases: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for each of the LM's parameters, one at a time, on every rank.

    Under FSDP2 each sharded DTensor is all-gathered (``full_tensor()``, a collective: all ranks must
    iterate in step) and the gathered copy is dropped once the consumer moves on. Used to push weights
    into vLLM after each optimizer step. Names are those of ``unwrap_model(model).named_parameters()``;
    ``aliases=True`` yields a tied parameter under each of its names (e.g. ``lm_head.weight`` tied to
    the embeddings), as vLLM's weight reload needs.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    for name, p in unwrap_model(model).named_parameters(remove_duplicate=not aliases):
        t = p.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        yield name, t


def save_full_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Gather the full state dict and write it from rank 0 as safetensors (atomically: tmp + rename)."""
    sd = full_state_dict(model)
    if is_main():
        from safetensors.torch import save_file
        tmp = f"{os.fspath(path)}.tmp"
        # safetensors refuses shared storage (tied embeddings): clone into separate tensors.
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, tmp)
        os.replace(tmp, path)
    barrier()


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
