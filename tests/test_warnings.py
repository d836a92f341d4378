"""Our own modules compile and import without a warning.

pyproject's ``filterwarnings`` makes every warning raised from ``upg_kernels``, ``upg_trainer`` and ``bench``
an error during the tests. Compile-time warnings (an invalid escape sequence in a docstring, say) are
issued once, when the byte code is written, so a cached ``.pyc`` would hide them; this test compiles every
source file afresh with warnings as errors.
"""
import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("upg_kernels", "python/upg_trainer", "bench") for p in (ROOT / d).rglob("*.py"))


def test_sources_found():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
    src = path.read_text(encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(src, str(path), "exec")


def test_import_prints_no_warning():
    """``python -W error -c 'import upg_kernels'`` in a fresh interpreter (no .pyc written)."""
    code = "import upg_kernels, upg_kernels.integrations.trl, upg_kernels.integrations.verl"
    env_path = f"{ROOT}:{ROOT / 'python'}"
    res = subprocess.run([sys.executable, "-B", "-W", "error", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
