"""One adapter per implementation. Each computes a problem's op (see :mod:`bench.problems`) from an
:class:`~bench.problems.Inputs` set and returns the scalar loss, or the [B, T] log-probs for ``logprobs``.

Adapters import their library lazily: an implementation that is not installed, or whose API is not in
this checkout, reports ``missing: <reason>``; one that has no such op reports ``n/a: <reason>``. No
row is ever dropped.
"""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

import torch

from upg_kernels import settings
from upg_kernels.kernels.backends import BACKENDS, FORWARD_PATHS

from .problems import IGNORE_INDEX, EPS_HIGH, EPS_LOW, Inputs, Problem, loss_from_logp


@contextmanager
def environ(values: dict):
    """Set environment variables for the duration (restored after)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interp() -> bool:
    """Whether Triton kernels run in the interpreter here (a function: tests patch it)."""
    return settings.interpreter_on()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


class Impl:
    name = "?"
    description = ""
    ops: tuple[str, ...] = ()

    def __init__(self):
        self.detail = ""

    def status(self, op: str, device: torch.device) -> str | None:
        """None when runnable, else ``"missing: ..."`` / ``"n/a: ..."``."""
        if op not in self.ops:
            return f"n/a: {self.name} has no {op} op"
        return None

    def prepare(self, problem: Problem, device: torch.device) -> None:
        """Called once per problem before its first call (compiled impls reset their caches here)."""

    def forward(self, op: str, x: Inputs) -> torch.Tensor:
        raise NotImplementedError


def objective(op: str, out: torch.Tensor, x: Inputs) -> torch.Tensor:
    """The scalar to differentiate: the loss itself, or ``sum(logp * g)`` for ``logprobs``."""
    if op == "logprobs":
        return (out.float() * x.grad_out).sum()
    return out


# ----------------------------------------------------------------------------- torch eager / compile
def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The TRL path: logits in the inputs' dtype -> fp32 -> log_softmax -> gather."""
    logits = hidden @ weight.T
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_op(op, hidden, weight, targets, mask, advantages, old_logprobs, is_demo, grad_out):
    x = Inputs(hidden, weight, targets, mask, advantages, old_logprobs, is_demo, grad_out, 0)
    logp = eager_logprobs(hidden, weight, targets)
    if op == "logprobs":
        return logp
    return loss_from_logp(op, logp, x)


def _args(x: Inputs):
    return (x.hidden, x.weight, x.targets, x.mask, x.advantages, x.old_logprobs, x.is_demo, x.grad_out)


class Eager(Impl):
    name = "eager"
    description = "PyTorch eager, materialized logits (logits -> fp32 -> log_softmax -> gather, the TRL path)"
    ops = ("logprobs", "sft", "grpo", "hpt")

    def __init__(self):
        super().__init__()
        self.detail = "torch eager: hidden @ W.T, .float(), log_softmax, gather, loss epilogue"

    def forward(self, op, x):
        return eager_op(op, *_args(x))


class Compiled(Impl):
    name = "compile"
    description = "the eager path under torch.compile (default mode, dynamic=False)"
    ops = ("logprobs", "sft", "grpo", "hpt")

    def __init__(self):
        super().__init__()
        self.fn = None
        self.detail = "torch.compile(eager path, dynamic=False), compiled once per problem"

    def prepare(self, problem, device):
        import torch._dynamo
        torch._dynamo.reset()
        op = problem.op

        def fn(hidden, weight, targets, mask, advantages, old_logprobs, is_demo, grad_out):
            return eager_op(op, hidden, weight, targets, mask, advantages, old_logprobs, is_demo,
                            grad_out)
        self.fn = torch.compile(fn, dynamic=False)

    def forward(self, op, x):
        return self.fn(*_args(x))


# ----------------------------------------------------------------------------- ours
def _upg():
    return importlib.import_module("upg_kernels")


def _make_config(name: str, **overrides):
    """``LossConfig.preset(name)`` with the bench's settings (an unknown field is an error, so a
    renamed field can never silently change which loss is benchmarked)."""
    return _upg().LossConfig.preset(name, **overrides)


class Ours(Impl):
    """``upg_kernels.unified_policy_loss`` (sft, grpo, hpt) and ``token_logprobs`` (logprobs)."""
    name = "ours"
    description = "upg_kernels: unified_policy_loss (sft/grpo/hpt), token_logprobs (logprobs)"
    ops = ("logprobs", "sft", "grpo", "hpt")
    backend = "auto"
    PRESET = {"sft": "sft", "grpo": "grpo", "hpt": "hpt"}

    def status(self, op, device):
        s = super().status(op, device)
        if s:
            return s
        try:
            m = _upg()
        except Exception as e:  # pragma: no cover - the package is this repo
            return f"missing: import upg_kernels failed ({e})"
        need = "token_logprobs" if op == "logprobs" else "unified_policy_loss"
        if not hasattr(m, need):
            return f"missing: upg_kernels.{need} is not in this checkout"
        if op != "logprobs" and not hasattr(m, "LossConfig"):
            return "missing: upg_kernels.LossConfig is not in this checkout"
        if self.backend in BACKENDS and BACKENDS[self.backend].triton and device.type != "cuda" \
                and not _interp():
            return "n/a: the Triton backend needs CUDA (or TRITON_INTERPRET=1)"
        return None

    def _resolved_backend(self, device):
        try:
            from upg_kernels._backend import resolve_backend
            return resolve_backend(self.backend, device)
        except Exception:
            return self.backend

    def prepare(self, problem, device):
        be = self._resolved_backend(device)
        op = problem.op
        if op == "logprobs":
            self.detail = f"upg_kernels.token_logprobs(backend={be})"
            return
        self.cfg = _make_config(self.PRESET[op], kl_coef=0.0, entropy_coef=0.0,
                                eps_low=EPS_LOW, eps_high=EPS_HIGH)
        self.detail = (f"upg_kernels.unified_policy_loss(config=LossConfig.preset({self.PRESET[op]!r})"
                       f", backend={be})")

    def forward(self, op, x):
        return self.forward_kw(op, x)

    def forward_kw(self, op, x, **extra):
        m = _upg()
        if op == "logprobs":
            return m.token_logprobs(x.hidden, x.weight, x.targets, backend=self.backend)
        kw = dict(config=self.cfg, loss_mask=x.mask, backend=self.backend, **extra)
        if op == "sft":
            kw["targets"] = x.targets
        else:
            kw.update(targets=x.targets, advantages=x.advantages, old_logprobs=x.old_logprobs)
            if op == "hpt":
                kw["is_demo"] = x.is_demo
        targets = kw.pop("targets")
        out = m.unified_policy_loss(x.hidden, x.weight, targets, **kw)
        return out.loss if hasattr(out, "loss") else out


class _OursEnv(Ours):
    """``Ours`` with environment settings applied for the duration of each call."""
    backend = "triton"
    ENV: dict = {}
    KW: dict = {}

    def forward(self, op, x):
        with environ(self.ENV):
            if self.KW and op != "logprobs":
                return super().forward_kw(op, x, **self.KW)
            return super().forward(op, x)


def _table_adapters() -> tuple[type[Impl], ...]:
    """One adapter per row of the backend table (kernels/backends.py) besides the CUDA default, which
    ``ours`` runs (``backend="auto"``): ``ours-<short>``; and one per other forward path of the CUDA
    default: ``ours-<path short>`` (``UPG_KERNELS_TRITON_FORWARD`` set for the call)."""
    out = []
    for b in BACKENDS.values():
        if "cuda" not in b.auto_on:
            out.append(type(f"Ours_{b.name}", (Ours,), dict(
                name=f"ours-{b.short}", backend=b.name,
                description=f"upg_kernels with backend={b.name!r}: {b.summary}")))
            continue
        for f in b.forwards[1:]:
            fp = FORWARD_PATHS[f]
            out.append(type(f"Ours_{b.name}_{f}", (_OursEnv,), dict(
                name=f"ours-{fp.short}", backend=b.name, ENV={settings.TRITON_FORWARD.name: f},
                description=f"backend={b.name!r} with {settings.TRITON_FORWARD.name}={f}: {fp.summary}")))
    return tuple(out)


class OursBigWorkspace(_OursEnv):
    name = "ours-ws1g"
    description = "backend='triton' with a 1 GiB workspace (bigger token groups, fp32 dW when it fits)"
    ENV = {settings.WORKSPACE_BYTES.name: str(2**30)}


class OursGradInForward(_OursEnv):
    name = "ours-gif"
    description = ("unified_policy_loss(path='one_pass'): the one-pass path (6NHV; one budget, "
                   "UPG_KERNELS_ONE_PASS_BYTES, 3 GiB on CUDA, for the chunks and the float32 dW "
                   "accumulator of bf16/fp16)")
    ops = ("sft", "grpo", "hpt")
    KW = {"path": "one_pass"}


class OursLogprobsEpilogue(Impl):
    """``token_logprobs`` for the vocab-sized work, then the bench's loss formula in PyTorch: the
    kernel's cost alone, whatever the state of the loss layer."""
    name = "ours-tlp"
    description = "upg_kernels.token_logprobs + the loss epilogue in PyTorch"
    ops = ("sft", "grpo", "hpt")

    def status(self, op, device):
        if op == "logprobs":
            return "n/a: for logprobs this is the 'ours' row"
        s = super().status(op, device)
        if s:
            return s
        if not hasattr(_upg(), "token_logprobs"):
            return "missing: upg_kernels.token_logprobs is not in this checkout"
        return None

    def prepare(self, problem, device):
        from upg_kernels._backend import resolve_backend
        self.detail = (f"upg_kernels.token_logprobs(backend={resolve_backend('auto', device)}) "
                       "+ torch loss epilogue")

    def forward(self, op, x):
        logp = _upg().token_logprobs(x.hidden, x.weight, x.targets)
        return loss_from_logp(op, logp, x)


class OursDropIn(Impl):
    """Our drop-in replacements: ``FusedLinearGRPOLoss`` (Liger 0.8 API) and ``linear_cross_entropy``
    (CCE API), called exactly as the peers are called below."""
    name = "ours-dropin"
    description = "upg_kernels.FusedLinearGRPOLoss (Liger API) / upg_kernels.linear_cross_entropy (CCE API)"
    ops = ("logprobs", "sft", "grpo")
    NEEDS = {"logprobs": "linear_cross_entropy", "sft": "linear_cross_entropy",
             "grpo": "FusedLinearGRPOLoss"}

    def status(self, op, device):
        s = super().status(op, device)
        if s:
            return s
        if not hasattr(_upg(), self.NEEDS[op]):
            return f"missing: upg_kernels.{self.NEEDS[op]} is not in this checkout"
        return None

    def prepare(self, problem, device):
        m = _upg()
        if problem.op == "grpo":
            self.mod = m.FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                             epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
            self.detail = "upg_kernels.FusedLinearGRPOLoss(beta=0, loss_type='grpo')"
        else:
            red = "none" if problem.op == "logprobs" else "mean"
            self.detail = f"upg_kernels.linear_cross_entropy(reduction={red!r})"

    def forward(self, op, x):
        m = _upg()
        B, T, H = x.hidden.shape
        if op == "grpo":
            out = self.mod(x.hidden, x.weight, x.targets, x.mask, x.advantages,
                           old_per_token_logps=x.old_logprobs)
            return out[0] if isinstance(out, (tuple, list)) else out
        if op == "logprobs":
            return -m.linear_cross_entropy(x.hidden.view(-1, H), x.weight, x.targets.view(-1),
                                           reduction="none").view(B, T)
        return m.linear_cross_entropy(x.hidden.view(-1, H), x.weight, x.targets_ce.view(-1),
                                      ignore_index=IGNORE_INDEX, reduction="mean")


# ----------------------------------------------------------------------------- Liger
class Liger(Impl):
    name = "liger"
    description = ("Liger-Kernel: LigerFusedLinearCrossEntropyLoss (sft), LigerFusedLinearGRPOLoss (grpo), "
                   "both (hpt: GRPO on the RL rows + FLCE on the demo rows, two calls)")
    ops = ("sft", "grpo", "hpt")

    def status(self, op, device):
        if op == "logprobs":
            return "n/a: Liger has no public per-token log-prob op"
        s = super().status(op, device)
        if s:
            return s
        try:
            importlib.import_module("liger_kernel")
        except Exception as e:
            return f"missing: liger-kernel not installed ({type(e).__name__})"
        if op in ("sft", "hpt") and device.type != "cuda" and not _interp():
            return "n/a: Liger's cross-entropy kernel needs CUDA (or TRITON_INTERPRET=1)"
        return None

    def prepare(self, problem, device):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        # compiled=True is Liger's (and TRL's) default; on CPU the inductor compile of the loss math
        # costs more than it saves at smoke sizes, so it is off there
        compiled = device.type == "cuda"
        self.grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                             epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                             compiled=compiled)
        self.ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
        v = _version("liger-kernel") or "?"
        self.detail = {
            "sft": f"liger-kernel {v} LigerFusedLinearCrossEntropyLoss(reduction='mean')",
            "grpo": f"liger-kernel {v} LigerFusedLinearGRPOLoss(beta=0, loss_type='grpo', compiled={compiled})",
            "hpt": f"liger-kernel {v} LigerFusedLinearGRPOLoss on RL rows + LigerFusedLinearCrossEntropyLoss "
                   f"on demo rows (compiled={compiled})",
        }.get(problem.op, "")

    def _grpo(self, x, rows=None):
        h, y, m, a, o = x.hidden, x.targets, x.mask, x.advantages, x.old_logprobs
        if rows is not None:
            h, y, m, a, o = h[rows], y[rows], m[rows], a[rows], o[rows]
        out = self.grpo(h, x.weight, y, m, a, old_per_token_logps=o)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _ce(self, x, rows=None):
        H = x.hidden.shape[-1]
        h, y = x.hidden, x.targets_ce
        if rows is not None:
            h, y = h[rows], y[rows]
        return self.ce(x.weight, h.reshape(-1, H), y.reshape(-1))

    def forward(self, op, x):
        if op == "sft":
            return self._ce(x)
        if op == "grpo":
            return self._grpo(x)
        # hpt
        demo = x.is_demo
        total = None
        if bool((~demo).any()):
            total = self._grpo(x, ~demo)
        if bool(demo.any()):
            sft = self._ce(x, demo)
            total = sft if total is None else total + sft
        return total


# ----------------------------------------------------------------------------- Cut Cross-Entropy
class CCE(Impl):
    name = "cce"
    description = "Cut Cross-Entropy linear_cross_entropy (impl='cce', its default filter_eps='high')"
    ops = ("logprobs", "sft")
    filter_eps: str | float | None = "high"

    def status(self, op, device):
        if op in ("grpo", "hpt"):
            return f"n/a: CCE has no {op} loss (cross-entropy only)"
        s = super().status(op, device)
        if s:
            return s
        try:
            importlib.import_module("cut_cross_entropy")
        except Exception as e:
            return f"missing: cut-cross-entropy not installed ({type(e).__name__})"
        if device.type != "cuda":
            return "n/a: CCE's kernels need CUDA (they do not run under the Triton interpreter)"
        return None

    def prepare(self, problem, device):
        v = _version("cut-cross-entropy") or "?"
        red = "none" if problem.op == "logprobs" else "mean"
        self.detail = (f"cut-cross-entropy {v} linear_cross_entropy(impl='cce', reduction={red!r}, "
                       f"filter_eps={self.filter_eps!r})")

    def forward(self, op, x):
        from cut_cross_entropy import linear_cross_entropy
        B, T, H = x.hidden.shape
        if op == "logprobs":
            nll = linear_cross_entropy(x.hidden.view(-1, H), x.weight, x.targets.view(-1),
                                       reduction="none", filter_eps=self.filter_eps)
            return -nll.view(B, T)
        return linear_cross_entropy(x.hidden.view(-1, H), x.weight, x.targets_ce.view(-1),
                                    ignore_index=IGNORE_INDEX, reduction="mean",
                                    filter_eps=self.filter_eps)


class CCEExact(CCE):
    name = "cce-exact"
    description = "Cut Cross-Entropy with gradient filtering off (filter_eps=None)"
    filter_eps = None


REGISTRY: dict[str, type[Impl]] = {c.name: c for c in (
    Ours, *_table_adapters(), OursBigWorkspace, OursGradInForward, OursLogprobsEpilogue, OursDropIn, Eager, Compiled, Liger, CCE, CCEExact)}
DEFAULT_IMPLS = ("ours", "eager", "compile", "liger", "cce")


def make_impls(names: str | None) -> list[Impl]:
    names = names or ",".join(DEFAULT_IMPLS)
    out = []
    for n in [s for s in names.replace(" ", "").split(",") if s]:
        if n == "all":
            out.extend(c() for c in REGISTRY.values())
            continue
        if n not in REGISTRY:
            raise ValueError(f"unknown implementation {n!r}; known: {', '.join(REGISTRY)}")
        out.append(REGISTRY[n]())
    return out
