"""Run a worker function on ``world`` gloo processes (torch.multiprocessing spawn) and collect its results.

``run_world(worker, world, *args)`` spawns ``worker(rank, world, *args)`` after initializing a gloo process
group on 127.0.0.1; each worker returns a JSON-able dict, which comes back as a list indexed by rank."""
from __future__ import annotations

import json
import os
import socket
import tempfile


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo rendezvous or torchrun's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, worker, args):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = worker(rank, world, *args)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(worker, world: int, *args) -> list:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, free_port(), d, worker, args), nprocs=world, join=True)
        out = []
        for r in range(world):
            with open(os.path.join(d, f"{r}.json")) as f:
                out.append(json.load(f))
        return out


class ErrorMessages(dict):
    """Per-rank record of bad-input checks: ``catch(key, fn)`` stores the message of the ValueError/TypeError
    ``fn`` raises, or ``"no error"`` (the test then asserts on the messages, which come back as JSON)."""

    def catch(self, key, fn):
        try:
            fn()
            self[key] = "no error"
        except (ValueError, TypeError) as e:
            self[key] = str(e)
