"""Path selection by measurement (docs/kernels.md, "Path selection").

At the first call for a :func:`key` (device name, dtype, H, V, a power-of-2 bucket of the active rows
M, which gradients, entropy on or off, backend, loss or log-probs) every eligible path
(:mod:`.paths`) runs on the call's real inputs: one untimed warm-up, then up to :data:`ITERS` timed
runs, stopping early once the key has spent :data:`BUDGET_S` seconds. The fastest is kept in memory
and in ``paths.json`` under the cache directory (``UPG_KERNELS_CACHE_DIR``, default
``~/.cache/upg_kernels``; written atomically, versioned by the library, torch and triton versions).
A table written by ``python -m upg_kernels.tune`` (``UPG_KERNELS_PATH_TABLE`` or :func:`load_table`)
is consulted before measuring.

In a distributed job (``torch.distributed`` initialized, world size > 1) rank 0 measures and
broadcasts its choice; the key then leaves out M's bucket (ranks hold different token counts, and
every rank must reach the broadcast at the same call).

``UPG_KERNELS_AUTOTUNE``: ``measure``, ``model`` (no timing: ``one_pass`` where eligible, the
fewest flops, else ``two_pass``) or ``auto`` (measure on CUDA, the model elsewhere: a CPU call is
seconds long, so timing it would cost more than the budget). Tests inject timings with
:func:`set_timer`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path as _FsPath

import torch

from .. import settings
from .paths import ONE_PASS, PATH_NAMES, TWO_PASS

CACHE_FORMAT = 1
BUDGET_S = 1.0       # measuring cost per key, all paths together (after each path's warm-up)
ITERS = 3            # timed runs per path at most

_memory: dict[str, str] = {}
_table: dict[str, str] = {}
_table_loaded_from: str | None = None
_timer = None
_times: dict[str, dict[str, float]] = {}    # key -> path -> best ms, of the keys measured here
_mode_override: str | None = None            # the tuning CLI: "measure"
_cache_override: _FsPath | None = None       # the tuning CLI: a fresh directory


# ------------------------------------------------------------------------------------------ keys
def m_bucket(M: int) -> int:
    """The power of 2 at or above ``M`` (0 for none)."""
    return 0 if M <= 0 else 1 << (int(M) - 1).bit_length()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def key(device: torch.device, dtype: torch.dtype, H: int, V: int, M: int | None, grads: str,
        entropy: bool, backend: str, loss: bool) -> str:
    """The selection key. ``grads``: the gradients needed, a subset of ``"hwb"`` (hidden, weight,
    bias; ``""`` for none). In a distributed job (and with ``M=None``) the key has no M bucket."""
    mb = "any" if M is None or distributed() else m_bucket(M)
    return (f"{device_name(device)}|{str(dtype).replace('torch.', '')}|H{H}|V{V}|M{mb}|g{grads or '-'}"
            f"|e{int(bool(entropy))}|{backend}|{'loss' if loss else 'logprobs'}")


def distributed() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


# ------------------------------------------------------------------------------------------ cache
def versions() -> str:
    """What a cache file is valid for: the library, torch and triton versions."""
    from .. import __version__ as ours
    from .backends import triton_available
    tv = "none"
    if triton_available():
        try:
            from importlib.metadata import version
            tv = version("triton")
        except Exception:      # pragma: no cover - a triton without metadata
            tv = "unknown"
    return f"upg_kernels {ours}; torch {torch.__version__}; triton {tv}"


def cache_file() -> _FsPath:
    if _cache_override is not None:
        return _cache_override / "paths.json"
    d = settings.CACHE_DIR.get()
    base = _FsPath(d).expanduser() if d else _FsPath.home() / ".cache" / "upg_kernels"
    return base / "paths.json"


def _read(path: _FsPath, *, check_version: bool) -> dict[str, str]:
    """The entries of a cache / table file; {} (with a warning) when it is unreadable."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("entries is not an object")
        if check_version and (data.get("format") != CACHE_FORMAT or data.get("versions") != versions()):
            return {}          # another library / torch / triton: measure again
        return {k: v["path"] if isinstance(v, dict) else v for k, v in entries.items()
                if (v["path"] if isinstance(v, dict) else v) in PATH_NAMES}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"upg_kernels: ignoring the unreadable path file {path} ({e!r})", RuntimeWarning,
                      stacklevel=3)
        return {}


def write_entries(path: _FsPath, entries: dict[str, dict]) -> None:
    """Merge ``entries`` (key -> {"path": ..., "times_ms": {...}}) into the file ``path`` atomically
    (a temporary file in the same directory, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") == CACHE_FORMAT and data.get("versions") == versions():
            old = dict(data.get("entries", {}))
    except (OSError, ValueError, AttributeError):
        pass
    old.update(entries)
    body = json.dumps({"format": CACHE_FORMAT, "versions": versions(), "entries": old}, indent=1,
                      sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=".paths-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_table(file) -> int:
    """Load a path table (``python -m upg_kernels.tune --out FILE``); its entries win over
    measuring. Returns the number of entries. A file that cannot be read is a ValueError."""
    global _table, _table_loaded_from
    p = _FsPath(file)
    try:
        data = json.loads(p.read_text())
        entries = data["entries"]
        table = {k: (v["path"] if isinstance(v, dict) else v) for k, v in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"path table {p}: not a table written by python -m upg_kernels.tune ({e!r})") \
            from None
    bad = {k: v for k, v in table.items() if v not in PATH_NAMES}
    if bad:
        raise ValueError(f"path table {p}: unknown paths {bad}; expected one of {PATH_NAMES}")
    _table, _table_loaded_from = table, str(p)
    return len(table)


def _env_table() -> None:
    f = settings.PATH_TABLE.get()
    if f and f != _table_loaded_from:
        load_table(f)


def clear(memory: bool = True, table: bool = True) -> None:
    """Forget the in-memory choices (and the loaded table); the disk cache stays."""
    global _table, _table_loaded_from
    if memory:
        _memory.clear()
        _times.clear()
    if table:
        _table, _table_loaded_from = {}, None


def choices() -> dict[str, str]:
    """The in-memory choices (key -> path)."""
    return dict(_memory)


def measured() -> dict[str, dict[str, float]]:
    """The timings of the keys measured in this process (key -> path -> best ms)."""
    return {k: dict(v) for k, v in _times.items()}


# ------------------------------------------------------------------------------------------ timing
def force(mode: str | None = None, cache_dir=None) -> None:
    """Override ``UPG_KERNELS_AUTOTUNE`` (``mode``) and the cache directory for this process (None:
    back to the settings). The tuning CLI measures into a fresh directory this way."""
    global _mode_override, _cache_override
    if mode not in (None, "auto", "measure", "model"):
        raise ValueError(f"mode must be None, 'auto', 'measure' or 'model', got {mode!r}")
    _mode_override = mode
    _cache_override = None if cache_dir is None else _FsPath(cache_dir)


def set_timer(fn) -> None:
    """Replace the timer: ``fn(path, run) -> seconds`` (``run`` executes the path once); None
    restores the real one. For tests and for the tuning CLI."""
    global _timer
    _timer = fn


def _real_timer(path: str, run) -> float:
    dev_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if dev_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if dev_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(runners: dict, *, budget_s: float = BUDGET_S, iters: int = ITERS) -> dict[str, float]:
    """Best seconds of each path of ``runners`` (path -> zero-argument callable): one untimed
    warm-up each (compiles, allocations), then rounds over the paths (interleaved, so a change of
    load hits all of them) until ``iters`` rounds or ``budget_s`` is spent. A path that raises is
    left out."""
    timer = _timer or _real_timer
    best: dict[str, float] = {}
    live = []
    for name, run in runners.items():
        try:
            if _timer is None:
                run()                     # warm-up (not with injected timings: nothing to warm)
            live.append(name)
        except (RuntimeError, ValueError) as e:   # e.g. out of memory, a budget refusal
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"upg_kernels: path {name} left out of the selection ({e})", RuntimeWarning,
                          stacklevel=2)
    spent = 0.0
    for _ in range(iters):
        for name in live:
            t = float(timer(name, runners[name]))
            spent += t
            best[name] = min(best.get(name, float("inf")), t)
        if spent >= budget_s:
            break
    return best


def _broadcast(choice: str | None) -> str:
    obj = [choice]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


def choose(k: str, options: tuple[str, ...], runners, *, mode: str | None = None) -> str:
    """The path for key ``k`` among ``options``: memory, table, disk cache, else measured
    (``runners()`` builds path -> callable; only called when measuring) or, in ``model`` mode,
    ``one_pass`` where eligible. In a distributed job rank 0's choice (broadcast)."""
    if len(options) == 1:
        return options[0]
    got = _memory.get(k)
    if got in options:
        return got
    _env_table()
    mode = mode or _mode_override or settings.AUTOTUNE.get()
    dist = distributed()
    choice = None
    if not dist or torch.distributed.get_rank() == 0:
        choice = _lookup_or_measure(k, options, runners, mode)
    if dist:
        choice = _broadcast(choice)
    if choice not in options:       # e.g. a rank whose call cannot take rank 0's path
        choice = TWO_PASS
    _memory[k] = choice
    return choice


def _lookup_or_measure(k, options, runners, mode) -> str:
    got = _table.get(k)
    if got in options:
        return got
    if mode == "model":
        return ONE_PASS if ONE_PASS in options else TWO_PASS
    cf = cache_file()
    got = _read(cf, check_version=True).get(k)
    if got in options:
        return got
    times = measure({p: r for p, r in runners().items() if p in options})
    if not times:
        return TWO_PASS
    choice = min(times, key=times.get)
    _times[k] = {p: round(t * 1e3, 4) for p, t in times.items()}
    try:
        write_entries(cf, {k: {"path": choice, "times_ms": _times[k]}})
    except OSError as e:
        warnings.warn(f"upg_kernels: could not write the path cache {cf} ({e!r})", RuntimeWarning,
                      stacklevel=3)
    return choice


def auto_mode(device: torch.device) -> str:
    """``measure`` or ``model`` for a call on ``device`` (``UPG_KERNELS_AUTOTUNE``)."""
    m = _mode_override or settings.AUTOTUNE.get()
    if m != "auto":
        return m
    return "measure" if device.type == "cuda" else "model"


# ------------------------------------------------------------------------------------------ calls
MODEL_MIN_LOGITS = 2**24   # model mode: one_pass from N x V >= 16.7M logits (smaller: two_pass)


def resolve(path, *, backend: str, hidden, weight, bias, targets, p, loss: bool, grads: str,
            entropy: bool, one_pass_ok=None, hint=None, budget: int | None = None,
            no_sync: bool = False) -> str:
    """The path of one call (``path=`` argument or None). ``backend``: the resolved backend name;
    ``hidden``..``p``: the flat prepared inputs; ``grads``: the gradients needed (``"hwb"`` subset);
    ``one_pass_ok(M) -> bool``: whether the config and budget allow the one-pass path for M active
    rows; ``hint``: ``[N]`` bool rows with probably non-zero coefficients, or a callable giving them
    (measurement only). ``no_sync`` (capturable mode): never measure (measuring counts the active
    rows on the host); unpinned, such a call runs ``two_pass``."""
    from . import paths
    from .backends import get_backend
    be = get_backend(backend)
    want, _why = paths.pinned(path)
    if want is not None and want == path:
        if want == paths.TWO_PASS_GEMM_FORWARD and not be.triton:
            raise ValueError(f"path={want!r} needs a Triton backend; backend={backend!r}")
        if want == ONE_PASS and not (loss and grads):
            raise ValueError(f"path={want!r} needs a loss with gradients (unified_policy_loss with "
                             "inputs that require grad)")
        return want                            # the argument: taken as asked
    N, V = hidden.shape[0], weight.shape[0]
    if want is not None or hidden.device.type == "meta" or N == 0 or no_sync or _compiling():
        ok = want != ONE_PASS or one_pass_ok is None or one_pass_ok(max(N, 1))   # a plan: no sync
        options = paths.eligible(triton=be.triton, loss=loss, grads=bool(grads), one_pass_ok=ok)
        return paths.fit(want or TWO_PASS, options)
    mode = auto_mode(hidden.device)
    if mode == "model":
        options = paths.eligible(triton=be.triton, loss=loss, grads=bool(grads),
                                 one_pass_ok=N * V >= MODEL_MIN_LOGITS
                                 and (one_pass_ok is None or one_pass_ok(N)))
        return ONE_PASS if ONE_PASS in options else TWO_PASS
    M = int((targets != p.ignore_index).sum())
    ok = one_pass_ok is None or one_pass_ok(M)
    options = paths.eligible(triton=be.triton, loss=loss, grads=bool(grads), one_pass_ok=ok)
    k = key(hidden.device, hidden.dtype, hidden.shape[1], V, M, grads,
            entropy, backend, loss)
    return choose(k, options, lambda: runners(be, hidden, weight, bias, targets, p, grads=grads,
                                               entropy=entropy, hint=hint() if callable(hint) else hint,
                                               budget=budget), mode=mode)


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:      # pragma: no cover - older torch
        return False


def runners(be, hidden, weight, bias, targets, p, *, grads: str, entropy: bool, hint=None,
            budget=None) -> dict:
    """path -> a zero-argument callable running that path once on the real inputs, with unit
    coefficients on the hinted rows (the real ones are known only after the forward)."""
    from .one_pass import forward_with_grads
    from .paths import PATHS
    from .. import settings as _s   # noqa: F401
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = targets != p.ignore_index
    g = (valid if hint is None else (valid & hint)).to(cd)
    ge = g if entropy else None
    nh, nw, nb = "h" in grads, "w" in grads, "b" in grads and bias is not None

    def two_pass(fwd):
        def run():
            with torch.no_grad():
                logp, ent, lse = be.forward(hidden, weight, bias, targets, p, path=fwd)
                if grads:
                    be.backward(hidden, weight, bias, targets, lse, ent, g, ge, p, nh, nw, nb)
        return run

    def one_pass():
        with torch.no_grad():
            forward_with_grads(hidden, weight, bias, targets, p,
                               lambda lp, en, done: (g, torch.zeros_like(g) if ge is None else ge),
                               budget=budget, rows_impl="triton" if be.triton and cd != torch.float64
                               else "torch", hint=hint, need_hidden=nh, need_weight=nw, need_bias=nb)

    out = {}
    for name, path in PATHS.items():
        if path.one_pass:
            out[name] = one_pass
        elif path.forward is None or path.forward in be.forwards:
            out[name] = two_pass(path.forward)
    return out
