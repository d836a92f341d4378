#!/usr/bin/env python
r"""Hybrid Post-Training: per prompt, RL on its 8 rollouts if any is correct (P > gamma = 0),
else SFT on its demonstration, in one loss (docs/losses.md, HPT).

Paper setup (8 GPUs, FSDP2, colocated vLLM; see docs/examples.md for resources)::

    torchrun --nproc_per_node 8 examples/hpt.py --config examples/configs/hpt_qwen2.5_math_7b.yaml \
        --model.path /models/Qwen2.5-Math-7B --data.path /data/openr1_math_46k.parquet

CPU smoke run of the same script (embedded tiny model and task, well under a minute)::

    python examples/hpt.py --config examples/configs/hpt_qwen2.5_math_7b.yaml --model.path embedded \
        --data.path embedded --data.eval_path embedded --data.num_train 64 --data.num_eval 8 \
        --model.dtype float32 --train.strategy none \
        --train.mixed_precision none --rollout.engine hf --rollout.max_new_tokens 24 \
        --data.max_prompt_tokens 128 --data.max_completion_tokens 64 --train.max_steps 2 \
        --train.batch_size 4 --train.grad_accum 1 --train.lr 1e-3 --output.dir runs/example_hpt

Every `--section.field VALUE` option of `upg-train hpt --help` overrides the YAML file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("hpt", sys.argv[1:]))
