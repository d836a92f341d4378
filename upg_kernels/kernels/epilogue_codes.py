"""Codes and parameters of the fused loss epilogue, without triton (the host side imports them).

The kernel itself is in ``triton_epilogue``; ``losses/fused.py`` builds :class:`EpilogueParams` from a
``LossConfig`` and must import on machines without triton.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

STABILIZATION_CODES = {"none": 0, "clip": 1, "cispo": 2, "sapo": 3}
REFERENCE_CODES = {"current": 0, "old": 1, "one": 2, "shaped": 3}
LIKELIHOOD_CODES = {"logp": 0, "dft": 1, "chi2": 2, "hellinger": 3}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
ROLLOUT_CODES = {None: 0, "token_truncate": 1, "token_mask": 2}
# per-token part codes (int8)
PART_NONE, PART_MAIN, PART_DEMO_SFT, PART_DEMO_SHAPED = 0, 1, 2, 3
FLAG_LOW, FLAG_HIGH, FLAG_DUAL = 1, 2, 4


def _mode(codes: dict | None, constexpr: str, default):
    """A mode field: ``LossConfig.<name>`` through ``codes`` (None: ``bool``), passed to the kernel as
    the constexpr ``constexpr``."""
    return field(default=default, metadata=dict(kind="mode", codes=codes, constexpr=constexpr))


def _scalar(default: float, from_config=None):
    """A scalar field: an fp32 argument of ``_epilogue_kernel`` of the same name, from
    ``float(LossConfig.<name>)`` or ``from_config(cfg)``."""
    return field(default=default, metadata=dict(kind="scalar", from_config=from_config))


@dataclass(frozen=True)
class EpilogueParams:
    """The token-local part of a :class:`upg_kernels.LossConfig`, as kernel codes and scalars.

    The one list of what the fused epilogue takes from the config: every other list derives from
    these fields (:data:`MODE_FIELDS` / :data:`SCALAR_FIELDS`, :meth:`from_config`, the custom op's
    ``modes`` / ``scalars`` lists, the launcher's keyword arguments, the compile check's types). A
    new scalar is a ``LossConfig`` field, a field here with the same name, and the kernel argument
    of that name (and its use); tests/test_fused_epilogue.py checks that they agree."""
    stabilization: int = _mode(STABILIZATION_CODES, "STAB", 0)
    reference: int = _mode(REFERENCE_CODES, "REF", 0)
    likelihood: int = _mode(LIKELIHOOD_CODES, "LIK", 0)
    kl_type: int = _mode(KL_CODES, "KL_TYPE", 3)
    rollout_is: int = _mode(ROLLOUT_CODES, "ROLL", 0)
    kl_bias_correction: bool = _mode(None, "KL_BC", False)
    eps_low: float = _scalar(0.2)
    eps_high: float = _scalar(0.2)
    delta: float = _scalar(0.0, lambda c: c.delta or 0.0)             # 0 = no delta
    dual_clip: float = _scalar(0.0, lambda c: c.dual_clip or 0.0)     # 0 = no dual clip
    tau_pos: float = _scalar(1.0)
    tau_neg: float = _scalar(1.05)
    kl_coef: float = _scalar(0.0)
    entropy_coef: float = _scalar(0.0)
    log_cap: float = _scalar(0.0, lambda c: math.log(c.rollout_is_cap))  # log(rollout_is_cap)
    fdiv_beta: float = _scalar(0.1)
    shaping_gamma: float = _scalar(0.1)
    rl_coef: float = _scalar(1.0)
    demo_coef: float = _scalar(1.0)

    @classmethod
    def from_config(cls, cfg) -> "EpilogueParams":
        """The kernel parameters of a (token-local) ``LossConfig``."""
        kw = {}
        for f in fields(cls):
            m = f.metadata
            if m["kind"] == "mode":
                v = getattr(cfg, f.name)
                kw[f.name] = bool(v) if m["codes"] is None else int(m["codes"][v])
            else:
                kw[f.name] = float(m["from_config"](cfg) if m["from_config"] else getattr(cfg, f.name))
        return cls(**kw)

    def to_lists(self) -> tuple[list[int], list[float]]:
        """``(modes, scalars)`` in field order: the custom op's arguments (a schema has no dataclass)."""
        return ([int(getattr(self, n)) for n in MODE_FIELDS],
                [float(getattr(self, n)) for n in SCALAR_FIELDS])

    @classmethod
    def from_lists(cls, modes, scalars) -> "EpilogueParams":
        if len(modes) != len(MODE_FIELDS) or len(scalars) != len(SCALAR_FIELDS):
            raise ValueError(f"expected {len(MODE_FIELDS)} modes and {len(SCALAR_FIELDS)} scalars, "
                             f"got {len(modes)} and {len(scalars)}")
        kw = {f.name: bool(v) if f.metadata["codes"] is None else int(v)
              for f, v in zip((f for f in fields(cls) if f.metadata["kind"] == "mode"), modes)}
        kw.update({n: float(v) for n, v in zip(SCALAR_FIELDS, scalars)})
        return cls(**kw)

    def mode_constexprs(self) -> dict:
        """``{constexpr name: code}`` of the mode fields."""
        return {f.metadata["constexpr"]: getattr(self, f.name) for f in fields(self)
                if f.metadata["kind"] == "mode"}

    def kernel_scalars(self) -> dict:
        """``{argument name: float}``: the kernel's scalar arguments, by name."""
        return {n: float(getattr(self, n)) for n in SCALAR_FIELDS}


MODE_FIELDS = tuple(f.name for f in fields(EpilogueParams) if f.metadata["kind"] == "mode")
SCALAR_FIELDS = tuple(f.name for f in fields(EpilogueParams) if f.metadata["kind"] == "scalar")
