"""The registry of Triton kernel variants for the ahead-of-time compile check (``upg_kernels.aot_check``).

Every Triton kernel module listed in :data:`upg_kernels.kernels.TRITON_KERNEL_MODULES` defines

    def aot_variants() -> list[KernelVariant]

next to its launcher, built from the SAME helpers the launcher uses to pick block configs and
constexpr flags, so that the check compiles what the GPU will run. This module does not import
triton (the records only hold the kernel object); ``aot_check`` does the compiling.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

# pointer element types, in triton's signature spelling
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# hidden sizes that pick the "multiple of the H chunk" and the "odd" block configs
EVEN_H_EXAMPLE, ODD_H_EXAMPLE = 4096, 4100


def ptr(dtype: torch.dtype) -> str:
    """``"*bf16"`` etc.: the signature type of a pointer to ``dtype``."""
    return "*" + DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class KernelVariant:
    """One compilation of one kernel: what ``kernel[grid](...)`` would specialize to on the GPU.

    ``types`` maps every runtime (non-constexpr) argument to its type string (``"*bf16"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` holds every ``tl.constexpr`` argument. ``divisible`` names
    the arguments that the launcher's typical call makes multiples of 16 (pointers from the torch
    allocator, ``H`` and strides of real models): triton specializes on that, so the check does too.
    """
    kernel: Any
    variant: str
    types: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    divisible: tuple[str, ...] = field(default=())
    equal_to_1: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    def signature(self) -> dict[str, str]:
        """The full signature for ``triton.compiler.ASTSource``; every argument must be typed."""
        names = list(self.kernel.arg_names)
        missing = [a for a in names if a not in self.types and a not in self.constexprs]
        extra = [a for a in (*self.types, *self.constexprs) if a not in names]
        if missing or extra:
            raise ValueError(f"{self.name} [{self.variant}]: the registered variant does not match "
                             f"the kernel's arguments (untyped: {missing}, unknown: {extra})")
        return {a: ("constexpr" if a in self.constexprs or a in self.equal_to_1 else self.types[a])
                for a in names}

    def constants(self) -> dict:
        """The constexpr values for ``ASTSource``: ``constexprs`` and 1 for each ``equal_to_1``."""
        return {**self.constexprs, **{a: 1 for a in self.equal_to_1}}

    def spec(self) -> tuple:
        """What the JIT keys a compile on, for comparing with :func:`spec_of_launch`."""
        return (self.name, tuple(sorted(self.types.items())), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.divisible)), tuple(sorted(self.equal_to_1)), self.num_warps,
                self.num_stages)

    def attrs(self) -> dict:
        """``tt.divisibility = 16`` on the ``divisible`` arguments (ASTSource's ``attrs``)."""
        names = list(self.kernel.arg_names)
        return {(names.index(a),): [["tt.divisibility", 16]] for a in self.divisible}


def int_specialization(value: int) -> str:
    """How triton's JIT (3.x, ``specialize_impl``) specializes an integer argument at launch:
    ``"1"`` for the value 1 (it becomes a constant), ``"D"`` for a multiple of 16 (``tt.divisibility =
    16``), else ``""``. Pointers are ``"D"`` when their address is a multiple of 16."""
    if value == 1:
        return "1"
    return "D" if value % 16 == 0 else ""


def constexpr_args(kernel) -> set[str]:
    """The names of ``kernel``'s ``tl.constexpr`` parameters (from its Python signature)."""
    import inspect
    fn = getattr(kernel, "fn", kernel)
    return {n for n, prm in inspect.signature(fn).parameters.items()
            if "constexpr" in str(prm.annotation)}


def spec_of_launch(kernel, args, kwargs) -> tuple:
    """The :meth:`KernelVariant.spec` of ``kernel[grid](*args, **kwargs)`` with these real values:
    tensors typed by dtype (divisible when their address is 16-byte aligned: the torch allocator's
    blocks are, views at an offset may not be), ints as i32/i64 by range and
    :func:`int_specialization`, floats as fp32; the ``tl.constexpr`` parameters (positional or
    keyword) are the constexprs; ``num_warps`` / ``num_stages`` the launch options."""
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
    unknown = [k for k in values if k not in names]
    if unknown:
        raise TypeError(f"launch arguments {unknown} are not parameters of the kernel")
    cxn = constexpr_args(kernel)
    types, cx, div, one = {}, {}, [], []
    for a in names:
        if a not in values:
            continue                      # a defaulted parameter the launch leaves out
        v = values[a]
        if a in cxn:
            cx[a] = v
        elif isinstance(v, torch.Tensor):
            types[a] = ptr(v.dtype)
            if v.data_ptr() % 16 == 0:
                div.append(a)
        elif isinstance(v, bool):
            types[a] = "u1"
        elif isinstance(v, int):
            types[a] = "i32" if -2**31 <= v < 2**31 else "i64"
            k = int_specialization(v)
            if k == "1":
                one.append(a)
            elif k == "D":
                div.append(a)
        elif isinstance(v, float):
            types[a] = "fp32"
        else:
            raise TypeError(f"{a}: cannot type a launch argument of type {type(v).__name__}")
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    return (name, tuple(sorted(types.items())), tuple(sorted(cx.items())), tuple(sorted(div)),
            tuple(sorted(one)), kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))


def tail(v: KernelVariant, *args: str, name: str = "tail") -> KernelVariant:
    """``v`` with the integer arguments ``args`` not divisible by 16: the specialization of the
    launches whose row count (or vocabulary bound) is not a multiple of 16, e.g. a plan's last
    token group."""
    return replace(v, variant=f"{v.variant} {name}",
                   divisible=tuple(a for a in v.divisible if a not in args))


def fp32_weight(v: KernelVariant) -> KernelVariant:
    """``v`` with a float32 weight (``w_ptr``): autocast's launches, whose W tiles the kernel casts to
    the hidden states' type in registers (kernels/workspace.py)."""
    return replace(v, variant=f"{v.variant} w=fp32", types={**v.types, "w_ptr": "*fp32"})


def flag_cover(flags: dict[str, tuple], base: dict[str, Any]) -> list[dict[str, Any]]:
    """A covering set of flag combinations: ``base``, ``base`` with each flag set to each of its
    other values (one at a time), and every flag at its last value ("all on"). Each value of
    each flag is thus compiled at least once, next to the launcher's common case."""
    out = [dict(base)]
    for k, values in flags.items():
        for v in values:
            if v != base[k]:
                out.append({**base, k: v})
    out.append({**base, **{k: values[-1] for k, values in flags.items()}})
    seen, uniq = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def label(flags: dict[str, Any], prefix: str = "") -> str:
    """A short variant name: ``prefix`` and the flags that are on / not at their default."""
    parts = [prefix] if prefix else []
    for k, v in flags.items():
        if v is True:
            parts.append(k.lower())
        elif v not in (False, None, 0):
            parts.append(f"{k.lower()}={v}")
    return " ".join(parts) or "base"
