"""Test set-up for tests/ and bench/: without CUDA, Triton kernels run under the interpreter
(TRITON_INTERPRET=1), and tests marked ``gpu`` are skipped; the path selection's cache goes to a
temporary directory (UPG_KERNELS_CACHE_DIR).

The variable must be set before triton is first imported, hence here, at collection time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the path selection's disk cache (docs/kernels.md "Path selection") in a directory of this session:
# tests never read a choice measured elsewhere, nor write into the user's ~/.cache
_CACHE_DIR = None
if not os.environ.get("UPG_KERNELS_CACHE_DIR"):
    import tempfile
    _CACHE_DIR = os.environ["UPG_KERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="upg-kernels-test-cache-")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    if _CACHE_DIR is not None:
        import shutil
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
