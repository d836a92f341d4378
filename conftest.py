"""Test set-up for tests/ and bench/: without CUDA, Triton kernels run under the interpreter
(TRITON_INTERPRET=1), and tests marked ``gpu`` are skipped.

The variable must be set before triton is first imported, hence here, at collection time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
