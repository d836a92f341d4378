"""Atomic checkpoints and the append-only metrics log.

A checkpoint is a directory ``<out>/checkpoints/step-00000010/`` holding

    model/                 save_pretrained output (config + model.safetensors) and the tokenizer
    optimizer.pt           optimizer state (full, unsharded)
    trainer_state.pt       step, scheduler, data position, RNG states (python, numpy, torch, cuda)

It is written into ``<out>/checkpoints/.tmp-step-...`` and renamed into place only when complete,
so a directory named ``step-*`` is always a whole checkpoint: a run killed mid-save leaves only a
``.tmp-*`` directory, which the next start deletes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def ckpt_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    root = ckpt_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def clean_partial(out_dir: str) -> None:
    """Remove ``.tmp-*`` directories left by a run killed while saving."""
    root = ckpt_root(out_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(out_dir: str, step: int, *, model_state: dict, save_model_fn, optimizer_state: dict,
                    trainer_state: dict, keep_last: int = 2) -> str:
    """Write a checkpoint atomically. ``save_model_fn(dir)`` writes the model (+ tokenizer) into ``dir``."""
    root = ckpt_root(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_model_fn(os.path.join(tmp, "model"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(dict(trainer_state, step=step, rng=rng_state()), os.path.join(tmp, "trainer_state.pt"))
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(model state dict, optimizer state, trainer state) of a checkpoint, or a clear error."""
    from safetensors.torch import load_file

    model_dir = os.path.join(path, "model")
    try:
        shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not shards:
            raise FileNotFoundError(f"no .safetensors file in {model_dir}")
        sd = {}
        for f in shards:
            sd.update(load_file(os.path.join(model_dir, f)))
        opt = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
        st = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        if "step" not in st:
            raise KeyError("trainer_state.pt has no 'step'")
    except Exception as e:
        raise RuntimeError(f"checkpoint {path!r} is unreadable ({type(e).__name__}: {e}); "
                           "delete it to resume from an earlier one, or start without --output.resume") from e
    return sd, opt, st


def load_model_weights(model, sd: dict, path: str) -> None:
    """Load a (possibly tie-deduplicated) state dict; only tied parameters may be missing."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {path!r} does not match the model: unexpected keys {unexpected[:5]}")
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
    really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise RuntimeError(f"checkpoint {path!r} does not match the model: missing keys {really_missing[:5]}")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed and fsynced as it is written."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: Optional[int]) -> None:
        """Keep only complete rows with ``step <= step`` (all rows dropped for None): used on resume."""
        if not self.enabled:
            return
        rows = []
        if step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if r.get("step", 0) <= step:
                        rows.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows
