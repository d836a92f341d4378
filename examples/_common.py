"""Shared driver of examples/sft.py, grpo.py and hpt.py: the trainer's Python API in five lines.

    cfg = parse_config([command, *argv])   # --config FILE.yaml, then any --section.field VALUE
    trainer = Trainer(cfg)                 # model, data, rewards, rollout engine, DDP/FSDP2 wrapping
    trainer.train()                        # metrics.jsonl, plots.png, checkpoints/, final/

Run the scripts with ``python`` (one process) or ``torchrun --nproc_per_node N`` (one process per
GPU; set ``--train.strategy fsdp2`` or ``ddp``, the example configs already do).
"""
from __future__ import annotations

import json
import os
import sys


def _summary(metrics_path: str) -> str:
    last_train, last_eval = None, None
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("kind") == "train":
                last_train = row
            elif row.get("kind") == "eval":
                last_eval = row
    parts = []
    if last_train:
        parts.append(f"step {last_train['step']}: loss {last_train['loss']:.4f}")
        for k in ("reward", "accuracy", "sft_share"):
            if k in last_train:
                parts.append(f"{k} {last_train[k]:.3f}")
    if last_eval and "eval/accuracy" in last_eval:
        parts.append(f"eval accuracy {last_eval['eval/accuracy']:.3f}")
    return ", ".join(parts)


def run(command: str, argv: list[str]) -> int:
    from upg_trainer import distributed as dist
    from upg_trainer.cli import parse_config
    from upg_trainer.trainer import Trainer

    cfg = parse_config([command, *argv])  # same options and --help as `upg-train COMMAND`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        trainer = Trainer(cfg)
        trainer.train()
        if dist.is_main():
            print(f"[{command}] {_summary(os.path.join(cfg.output.dir, 'metrics.jsonl'))}")
            print(f"[{command}] outputs in {cfg.output.dir}/ (metrics.jsonl, plots.png, final/)")
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run examples/sft.py, examples/grpo.py or examples/hpt.py")
