"""Path selection by measurement (docs/kernels.md, "Path selection").

At the first call for a :func:`key` (device name, dtype, H, V, a power-of-2 bucket of the active rows
M, which gradients, entropy on or off, backend, loss or log-probs) every eligible *candidate* runs:
a path (:mod:`.paths`), and for the two-pass paths of a backend whose backward launches the dz kernel
(bf16/fp16, H a multiple of 64) each dz tile of ``triton_dz.DZ_TILES`` with it (``"path@tile"``).
The tile changes only the backward and the forward path only the forward, so such a key times parts:
each two-pass forward (``fwd:<path>``), the backward once per tile (``bwd:<tile>``) and the one-pass
path whole; a candidate's time is the sum of its parts. Each part: one untimed warm-up, then up to
:data:`ITERS` interleaved timed runs, stopping early once the key has spent :data:`BUDGET_S` seconds.
On CUDA the parts run on the call's real inputs; elsewhere on a row sample of them, the times scaled
to the call's rows (:func:`sample_runners`). The fastest
candidate is kept in memory and in ``paths.json`` under the cache directory
(``UPG_KERNELS_CACHE_DIR``, default ``~/.cache/upg_kernels``; written atomically, format
:data:`CACHE_FORMAT`, versioned by the library, torch and triton versions). A table written by
``python -m upg_kernels.tune`` (``UPG_KERNELS_PATH_TABLE`` or :func:`load_table`) is consulted before
measuring.

In a distributed job (``torch.distributed`` initialized, world size > 1) rank 0 measures and
broadcasts its choice (path and tile); the key then leaves out M's bucket (ranks hold different token
counts, and every rank must reach the broadcast at the same call).

``UPG_KERNELS_AUTOTUNE``: ``measure``, ``model`` (no timing: ``one_pass`` where eligible from
:data:`MODEL_MIN_LOGITS` logits, else ``two_pass``; the default tile) or ``auto`` (measure on CUDA and,
for non-Triton backends, on the CPU from :data:`CPU_MEASURE_MIN_WORK` = N·H·V; the model elsewhere).
``UPG_KERNELS_TRITON_DZ_CONFIG`` pins the tile (only the paths are timed then). Tests inject timings
with :func:`set_timer`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path as _FsPath

import torch

from .. import settings
from . import one_pass
from .paths import ONE_PASS, PATH_NAMES, TWO_PASS

CACHE_FORMAT = 2     # 2: entries carry the dz tile ("dz_tile"); format 1 files are ignored
BUDGET_S = 1.0       # measuring cost per key, all parts together (after each part's warm-up)
ITERS = 3            # timed runs per part at most
SAMPLE_RUN_S = 0.25  # off CUDA: the row sample is sized so that the slowest part's run takes about this
PROBE_ROWS = 16      # off CUDA: the rows of the probe run that sizes the sample
PROBE_MAX_S = 0.5    # off CUDA: a probe run longer than this stops the measuring (the rule decides)
CPU_MEASURE_MIN_WORK = 2**27   # auto mode on the CPU measures from N·H·V (smaller: the model)

_memory: dict[str, str] = {}                 # key -> candidate ("path" or "path@tile")
_table: dict[str, str] = {}
_table_loaded_from: str | None = None
_timer = None
_measured: dict[str, dict] = {}   # key -> {"path", "dz_tile", "times_ms"[, "sample_rows"]}, measured here
_mode_override: str | None = None            # the tuning CLI: "measure"
_cache_override: _FsPath | None = None       # the tuning CLI: a fresh directory


# ------------------------------------------------------------------------------------------ keys
def m_bucket(M: int) -> int:
    """The power of 2 at or above ``M`` (0 for none)."""
    return 0 if M <= 0 else 1 << (int(M) - 1).bit_length()


def device_name(device: torch.device) -> str:
    """The device part of a key: the CUDA device's name; ``cpu<threads>t`` (torch's intra-op threads:
    the CPU's speed depends on them); else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    if device.type == "cpu":
        return f"cpu{torch.get_num_threads()}t"
    return device.type


def key(device: torch.device, dtype: torch.dtype, H: int, V: int, M: int | None, grads: str,
        entropy: bool, backend: str, loss: bool, w_dtype: torch.dtype | None = None) -> str:
    """The selection key. ``grads``: the gradients needed, a subset of ``"hwb"`` (hidden, weight,
    bias; ``""`` for none). ``w_dtype``: the weight's dtype where it differs from ``dtype`` (a float32
    weight under autocast, cast slab by slab: other costs, so another key). In a distributed job (and
    with ``M=None``) the key has no M bucket."""
    mb = "any" if M is None or distributed() else m_bucket(M)
    dt = str(dtype).replace("torch.", "")
    if w_dtype is not None and w_dtype != dtype:
        dt += "+w" + str(w_dtype).replace("torch.", "")
    return (f"{device_name(device)}|{dt}|H{H}|V{V}|M{mb}|g{grads or '-'}"
            f"|e{int(bool(entropy))}|{backend}|{'loss' if loss else 'logprobs'}")


def distributed() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def candidate(path: str, tile: str | None = None) -> str:
    """The selection's name of ``path`` run with the dz tile ``tile`` (None: not chosen)."""
    return path if tile is None else f"{path}@{tile}"


def split(cand: str) -> tuple[str, str | None]:
    """``(path, tile or None)`` of a :func:`candidate` name."""
    path, _, tile = cand.partition("@")
    return path, (tile or None)


def _accept(cand, options: tuple[str, ...]) -> str | None:
    """``cand`` (from memory, a table, the cache or rank 0) fitted to the ``options`` of a call:
    itself; its path alone where the tile is pinned (no tile in the options); a tile-less entry
    where the options carry tiles (the default tile); else None."""
    if not isinstance(cand, str):
        return None
    if cand in options:
        return cand
    path, tile = split(cand)
    if tile is not None and path in options:
        return path
    if tile is None and any(split(o)[0] == path for o in options):
        return path
    return None


def _entry_candidate(v) -> str:
    """The candidate of a cache / table entry (``{"path": ..., "dz_tile": ...}`` or a bare path)."""
    if isinstance(v, dict):
        tile = v.get("dz_tile")
        if tile is not None and not isinstance(tile, str):
            raise TypeError(f"dz_tile must be a string or null, got {tile!r}")
        return candidate(v["path"], tile)
    return v


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
        out = {k: _entry_candidate(v) for k, v in entries.items()}
        return {k: c for k, c in out.items() if isinstance(c, str) and split(c)[0] in PATH_NAMES}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"upg_kernels: ignoring the unreadable path file {path} ({e!r})", RuntimeWarning,
                      stacklevel=3)
        return {}


def write_entries(path: _FsPath, entries: dict[str, dict]) -> None:
    """Merge ``entries`` (key -> {"path": ..., "dz_tile": ..., "times_ms": {...}}) into the file
    ``path`` atomically
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
        table = {k: _entry_candidate(v) for k, v in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"path table {p}: not a table written by python -m upg_kernels.tune ({e!r})") \
            from None
    bad = {k: v for k, v in table.items() if not isinstance(v, str) or split(v)[0] not in PATH_NAMES}
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
        _measured.clear()
    if table:
        _table, _table_loaded_from = {}, None


def choices() -> dict[str, str]:
    """The in-memory choices (key -> candidate: ``"path"`` or ``"path@tile"``)."""
    return dict(_memory)


def measured() -> dict[str, dict]:
    """The entries of the keys measured in this process: key -> ``{"path", "dz_tile", "times_ms"}``
    (``times_ms``: candidate -> best ms; off CUDA estimated from row samples for the call's rows,
    ``sample_rows`` saying how many ran)."""
    return {k: {**v, "times_ms": dict(v["times_ms"])} for k, v in _measured.items()}


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


def _warm_up(runners: dict, *, timed: bool = False) -> dict[str, float]:
    """Run each of ``runners`` once (compiles, allocations): name -> seconds (0 untimed) of those
    that ran; a part that raises (out of memory, a budget refusal) is left out with a warning."""
    done = {}
    for name, run in runners.items():
        try:
            if timed:
                done[name] = _real_timer(name, run)
            else:
                run()
                done[name] = 0.0
        except (RuntimeError, ValueError) as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"upg_kernels: {name} left out of the path selection ({e})", RuntimeWarning,
                          stacklevel=3)
    return done


def measure(runners: dict, *, budget_s: float = BUDGET_S, iters: int = ITERS,
            warm: bool = True) -> dict[str, float]:
    """Best seconds of each part of ``runners`` (name -> zero-argument callable): one untimed
    warm-up each (compiles, allocations; ``warm=False``: the caller has run them), then rounds over
    the parts (interleaved, so a change of load hits all of them) until ``iters`` rounds or
    ``budget_s`` is spent. A part that raises in its warm-up is left out."""
    timer = _timer or _real_timer
    live = list(runners) if (_timer is not None or not warm) else list(_warm_up(runners))
    best: dict[str, float] = {}
    spent = 0.0
    for _ in range(iters):
        for name in live:
            t = float(timer(name, runners[name]))
            spent += t
            best[name] = min(best.get(name, float("inf")), t)
        if spent >= budget_s:
            break
    return best


def totals(parts: dict[str, float], options: tuple[str, ...]) -> dict[str, float]:
    """Each candidate of ``options`` with its time: timed whole (``"one_pass"``, or a path where no
    tile is chosen) or the sum of its parts (``"path@tile"``: ``fwd:path`` + ``bwd:tile``); a
    candidate with a part missing (it raised) is left out."""
    out = {}
    for c in options:
        path, tile = split(c)
        if c in parts:
            out[c] = parts[c]
        elif tile is not None and f"fwd:{path}" in parts and f"bwd:{tile}" in parts:
            out[c] = parts[f"fwd:{path}"] + parts[f"bwd:{tile}"]
    return out


def parts_of(options: tuple[str, ...]) -> set[str]:
    """The parts that time the candidates ``options`` (:func:`totals`' inverse)."""
    out = set()
    for c in options:
        path, tile = split(c)
        out |= {f"fwd:{path}", f"bwd:{tile}"} if tile is not None else {c}
    return out


def _broadcast(choice: str | None) -> str:
    obj = [choice]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


def choose(k: str, options: tuple[str, ...], runners, *, mode: str | None = None,
           fallback: str | None = None, runnable: tuple[str, ...] | None = None) -> str:
    """The candidate for key ``k`` among ``options`` (:func:`candidate` names): memory, table, disk
    cache, else measured (``runners()`` builds part name -> callable, or a :class:`Sample` of row
    samples, or None when even a sample is too expensive: then ``fallback``; only called when
    measuring) or, in ``model`` mode, ``one_pass`` where eligible. In a distributed job rank 0's
    choice (broadcast): ``options`` must then be alike on every rank (every rank reaches the same
    broadcast), and ``runnable`` (default ``options``) is the subset this rank's call can run,
    which rank 0 picks from."""
    if len(options) == 1:
        return options[0]
    got = _accept(_memory.get(k), options)
    if got is not None:
        return got
    _env_table()
    mode = mode or _mode_override or settings.AUTOTUNE.get()
    dist = distributed()
    choice = None
    if not dist or torch.distributed.get_rank() == 0:
        choice = _lookup_or_measure(k, runnable or options, runners, mode, fallback)
    if dist:
        choice = _broadcast(choice)
    choice = _accept(choice, options) or TWO_PASS   # e.g. a rank whose call cannot take rank 0's path
    _memory[k] = choice
    return choice


def _model_choice(options) -> str:
    return ONE_PASS if ONE_PASS in options else TWO_PASS


def _lookup_or_measure(k, options, runners, mode, fallback) -> str:
    got = _accept(_table.get(k), options)
    if got is not None:
        return got
    if mode == "model":
        return _model_choice(options)
    cf = cache_file()
    got = _accept(_read(cf, check_version=True).get(k), options)
    if got is not None:
        return got
    built = runners()
    if built is None:                      # even a row sample is over the budget: the rule
        return _accept(fallback, options) or _model_choice(options)
    if isinstance(built, Sample):          # off CUDA: estimated from row samples (warmed by the probe)
        times = totals(built.estimate(measure(built.runners, warm=not built.warmed)), options)
    else:
        need = parts_of(options)
        times = totals(measure({n: r for n, r in built.items() if n in need}), options)
    if not times:
        return TWO_PASS
    choice = min(times, key=times.get)
    path, tile = split(choice)
    entry = {"path": path, "dz_tile": tile,
             "times_ms": {c: round(t * 1e3, 4) for c, t in times.items()}}
    if isinstance(built, Sample):
        entry["sample_rows"] = built.rows
    _measured[k] = entry
    try:
        write_entries(cf, {k: entry})
    except OSError as e:
        warnings.warn(f"upg_kernels: could not write the path cache {cf} ({e!r})", RuntimeWarning,
                      stacklevel=3)
    return choice


def auto_mode(device: torch.device, *, triton: bool = False, work: int | None = None) -> str:
    """``measure`` or ``model`` for a call on ``device`` (``UPG_KERNELS_AUTOTUNE``): ``auto`` measures
    on CUDA, and on the CPU for a non-Triton backend (``triton``: the interpreter there) once the
    call's ``work`` (N·H·V) reaches :data:`CPU_MEASURE_MIN_WORK` (below, a call costs milliseconds:
    timing it would cost more than a wrong choice saves)."""
    m = _mode_override or settings.AUTOTUNE.get()
    if m != "auto":
        return m
    if device.type == "cuda":
        return "measure"
    if device.type == "cpu" and not triton and work is not None and work >= CPU_MEASURE_MIN_WORK:
        return "measure"
    return "model"


# ------------------------------------------------------------------------------------------ calls
MODEL_MIN_LOGITS = 2**24   # model mode: one_pass from N x V >= 16.7M logits (smaller: two_pass)


def dz_tiles(be, dtype: torch.dtype, H: int, grads: str, p) -> tuple[str, ...]:
    """The dz tiles the selection times for a call: those of ``triton_dz.DZ_TILES`` where the
    backend's backward launches the dz kernel (``be.dz_kernel``, no tile filtering), gradients are
    needed and the tile decides the launch (``triton_dz.tile_applies``: bf16/fp16, H a multiple of
    64, no ``UPG_KERNELS_TRITON_DZ_CONFIG`` pin); else none."""
    if not (be.dz_kernel and grads and p.filter_eps == 0):
        return ()
    from .triton_dz import DZ_TILES, tile_applies
    return tuple(DZ_TILES) if tile_applies(dtype, H) else ()


def resolve(path, *, backend: str, hidden, weight, bias, targets, p, loss: bool, grads: str,
            entropy: bool, one_pass_ok=None, hint=None, budget: int | None = None,
            no_sync: bool = False) -> tuple[str, str | None]:
    """``(path, dz tile or None)`` of one call (``path=`` argument or None). ``backend``: the resolved
    backend name; ``hidden``..``p``: the flat prepared inputs; ``grads``: the gradients needed
    (``"hwb"`` subset); ``one_pass_ok(M) -> bool``: whether the config and budget allow the one-pass
    path for M active rows; ``hint``: ``[N]`` bool rows with probably non-zero coefficients, or a
    callable giving them (measurement only). ``no_sync`` (capturable mode): never measure (measuring
    counts the active rows on the host); unpinned, such a call runs ``two_pass``. A pinned path (and
    model mode) runs the default tile (or ``UPG_KERNELS_TRITON_DZ_CONFIG``'s): tile None."""
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
        return want, None                      # the argument: taken as asked
    N, V = hidden.shape[0], weight.shape[0]
    # in a distributed job every rank must reach the same collective: nothing rank-local (N, M, the
    # one-pass budget at this rank's M) may decide whether the selection broadcasts
    dist = distributed()
    if want is not None or hidden.device.type == "meta" or (N == 0 and not dist) or no_sync or _compiling():
        ok = want != ONE_PASS or one_pass_ok is None or one_pass_ok(max(N, 1))   # a plan: no sync
        options = paths.eligible(triton=be.triton, loss=loss, grads=bool(grads), one_pass_ok=ok)
        return paths.fit(want or TWO_PASS, options), None
    H = hidden.shape[1]
    mode = auto_mode(hidden.device, triton=be.triton, work=None if dist else N * H * V)
    rule_ok = N * V >= MODEL_MIN_LOGITS and (one_pass_ok is None or one_pass_ok(N))
    rule = ONE_PASS if (loss and grads and rule_ok) else TWO_PASS
    if mode == "model":
        return rule, None
    valid = targets != p.ignore_index
    M = int(valid.sum())
    ok = N > 0 and (one_pass_ok is None or one_pass_ok(M))
    tiles = dz_tiles(be, hidden.dtype, H, grads, p)

    def candidates(one_pass_allowed):
        return tuple(candidate(o, t) for o in paths.eligible(triton=be.triton, loss=loss, grads=bool(grads),
                                                              one_pass_ok=one_pass_allowed)
                     for t in (tiles if (tiles and o != ONE_PASS) else (None,)))
    mine = candidates(ok)
    options = candidates(True) if dist else mine     # alike on every rank; rank 0 measures its own
    k = key(hidden.device, hidden.dtype, H, V, M, grads, entropy, backend, loss, weight.dtype)
    if any(split(o)[0] == ONE_PASS for o in options):   # its plan (budget, dW mode) changes its time
        k += one_pass.plan_key(hidden.device)

    def build():
        if N == 0:          # a rank without rows (distributed): nothing to time, the rule decides
            return None
        h = hint() if callable(hint) else hint
        kw = dict(grads=grads, entropy=entropy, tiles=tiles, budget=budget, only=parts_of(mine))
        if hidden.device.type == "cuda":
            return runners(be, hidden, weight, bias, targets, p, hint=h, **kw)
        return sample_runners(be, hidden, weight, bias, targets, p, valid, M, hint=h, **kw)

    got = choose(k, options, build, mode=mode, fallback=rule, runnable=mine)
    return split(got) if got in mine else (TWO_PASS, None)   # this rank's call cannot take rank 0's


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:      # pragma: no cover - older torch
        return False


@dataclass
class Sample:
    """Parts timed on a row sample of a call (off CUDA): ``runners`` on ``rows`` of the call's M active
    rows (all of them for a small call)."""
    runners: dict
    rows: int
    M: int
    warmed: bool = False      # the probe has run each part (no warm-up needed)

    def estimate(self, times: dict[str, float]) -> dict[str, float]:
        """Each part's seconds scaled to the call's rows: ``t * M / rows``."""
        return {name: t * self.M / self.rows for name, t in times.items()}


def sample_runners(be, hidden, weight, bias, targets, p, valid, M: int, *, hint=None, **kw):
    """Off CUDA: :func:`runners` on a row sample of the call's active rows (evenly spaced, so the
    hinted share is the call's), as a :class:`Sample`; None when even the probe is over the budget.
    Up to ``2 x`` :data:`PROBE_ROWS` active rows: the whole call. Else a probe runs each part once on
    :data:`PROBE_ROWS` rows (the warm-up; a run over :data:`PROBE_MAX_S` stops the measuring: the
    caller takes the rule), and the sample is sized so that the slowest part's run takes about
    :data:`SAMPLE_RUN_S` as if time were proportional to rows (at least ``2 x`` :data:`PROBE_ROWS`,
    at most M rows)."""
    act = valid.nonzero()[:, 0]

    def on(R):
        idx = act if R >= M else act[
            torch.linspace(0, M - 1, R, dtype=torch.float64, device=act.device).round().long()]
        return runners(be, hidden[idx], weight, bias, targets[idx], p,
                       hint=None if hint is None else hint[idx], **kw)

    R1 = PROBE_ROWS
    if M <= 2 * R1 or _timer is not None:       # small: the whole call; injected timings: nothing runs
        R = M if M <= 2 * R1 else 2 * R1
        return Sample(on(R), R, M)
    probe = on(R1)
    worst, live = 0.0, []
    for name, run in probe.items():
        done = _warm_up({name: run}, timed=True)
        if not done:
            continue                  # raised: left out (warned)
        if done[name] > PROBE_MAX_S:
            return None
        worst = max(worst, done[name])
        live.append(name)
    R = min(M, max(2 * R1, int(R1 * SAMPLE_RUN_S / max(worst, 1e-9))))
    sample = on(R)
    return Sample({n: sample[n] for n in live}, R, M, warmed=True)


def runners(be, hidden, weight, bias, targets, p, *, grads: str, entropy: bool, hint=None,
            budget=None, tiles: tuple[str, ...] = (), only=None) -> dict:
    """part name -> a zero-argument callable running it once on the given inputs, with unit
    coefficients on the hinted rows (the real ones are known only after the forward). Without
    ``tiles``: each path whole (its name). With ``tiles`` (and gradients): each two-pass forward
    (``fwd:<path>``), the backward once per tile in ``triton_dz.dz_tile_scope`` (``bwd:<tile>``, on
    the outputs of one forward made at its first run) and ``one_pass`` whole. ``only``: the part
    names wanted (:func:`parts_of` the call's candidates; None: all)."""
    from .one_pass import forward_with_grads
    from .paths import PATHS
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = targets != p.ignore_index
    g = (valid if hint is None else (valid & hint)).to(cd)
    ge = g if entropy else None
    nh, nw, nb = "h" in grads, "w" in grads, "b" in grads and bias is not None
    split_parts = bool(tiles) and bool(grads)
    fwd_out = {}

    def backward(lse, ent):
        be.backward(hidden, weight, bias, targets, lse, ent, g, ge, p, nh, nw, nb)

    def two_pass(fwd):
        def run():
            with torch.no_grad():
                logp, ent, lse = be.forward(hidden, weight, bias, targets, p, path=fwd)
                if grads and not split_parts:
                    backward(lse, ent)
        return run

    def backward_with(tile):
        from .triton_dz import dz_tile_scope

        def run():
            with torch.no_grad():
                if not fwd_out:
                    fwd_out["o"] = be.forward(hidden, weight, bias, targets, p)
                _, ent, lse = fwd_out["o"]
                with dz_tile_scope(tile):
                    backward(lse, ent)
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
            out[f"fwd:{name}" if split_parts else name] = two_pass(path.forward)
    if split_parts:
        for tile in tiles:
            out[f"bwd:{tile}"] = backward_with(tile)
    return out if only is None else {n: r for n, r in out.items() if n in only}
