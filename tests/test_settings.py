"""The settings module: every environment variable read in one place, with one parser per kind, and
documented in one table (docs/settings.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from upg_kernels import settings
from upg_kernels.settings import SETTINGS, Setting, parse_bool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw,want", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                      ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_one_boolean_parser(raw, want):
    assert parse_bool("X", raw) is want


def test_bad_values_name_the_variable(monkeypatch):
    for s, bad in ((settings.FUSED_EPILOGUE, "maybe"), (settings.WORKSPACE_BYTES, "-3"),
                   (settings.TORCH_CHUNK_BYTES, "64MiB"), (settings.TRITON_FORWARD, "cublas"),
                   (settings.TRITON_FWD_CONFIG, "128,128")):
        monkeypatch.setenv(s.name, bad)
        with pytest.raises(ValueError, match=s.name):
            s.get()


def test_defaults_and_values(monkeypatch):
    for s in SETTINGS:
        monkeypatch.delenv(s.name, raising=False)
        assert s.get() == s.default and not s.is_set()
        monkeypatch.setenv(s.name, "  ")          # empty = the default
        assert s.get() == s.default
    monkeypatch.setenv("UPG_KERNELS_GRAD_IN_FORWARD", "on")
    monkeypatch.setenv("UPG_KERNELS_FUSED_EPILOGUE", "off")
    monkeypatch.setenv("UPG_KERNELS_TRITON_FORWARD", "GEMM")
    monkeypatch.setenv("UPG_KERNELS_TRITON_DZ_CONFIG", "64,128,32,4,2,4")
    assert settings.GRAD_IN_FORWARD.get() is True and settings.FUSED_EPILOGUE.get() is False
    assert settings.TRITON_FORWARD.get() == "gemm"
    assert settings.TRITON_DZ_CONFIG.get() == (64, 128, 32, 4, 2, 4)


def test_the_library_reads_them(monkeypatch):
    """The consumers go through the rows (a change of the environment applies at the next call)."""
    from upg_kernels.kernels import torch_chunked, workspace
    from upg_kernels.losses.fused import fused_enabled
    monkeypatch.setenv("UPG_KERNELS_TORCH_CHUNK_BYTES", str(4 * 1000 * 7))
    assert torch_chunked.chunk_rows(1000) == 7
    monkeypatch.setenv("UPG_KERNELS_WORKSPACE_BYTES", "12345")
    assert workspace.workspace_bytes() == 12345
    monkeypatch.setenv("UPG_KERNELS_FUSED_EPILOGUE", "no")
    assert fused_enabled(None) is False and fused_enabled(True) is True


def test_docs_table_is_the_code():
    text = (ROOT / "docs" / "settings.md").read_text()
    assert settings.markdown_table() in text
    readme = (ROOT / "README.md").read_text()
    assert "docs/settings.md" in readme
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    assert all(isinstance(s, Setting) for s in SETTINGS)
    assert {getattr(settings, n) for n in dir(settings)
            if isinstance(getattr(settings, n), Setting)} == set(SETTINGS)


def _reads(tree):
    """Nodes that read the environment: os.getenv(...), os.environ.get(<literal>),
    os.environ[<literal>] loads and ``<x> in os.environ``."""
    def is_environ(n):
        return isinstance(n, ast.Attribute) and n.attr == "environ" and \
            isinstance(n.value, ast.Name) and n.value.id == "os"

    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            if n.func.attr == "getenv":
                yield n
            if n.func.attr == "get" and is_environ(n.func.value) and n.args and \
                    isinstance(n.args[0], ast.Constant):
                yield n
        if isinstance(n, ast.Subscript) and is_environ(n.value) and isinstance(n.ctx, ast.Load):
            yield n
        if isinstance(n, ast.Compare) and any(is_environ(c) for c in n.comparators):
            yield n


def test_only_settings_reads_the_environment():
    files = list((ROOT / "upg_kernels").rglob("*.py")) + list((ROOT / "bench").glob("*.py"))
    names = {s.name for s in SETTINGS if s.name.startswith("UPG_")}
    for path in files:
        if path.name == "settings.py" and path.parent.name == "upg_kernels":
            continue
        tree = ast.parse(path.read_text())
        found = [ast.unparse(n) for n in _reads(tree)]
        assert not found, f"{path.relative_to(ROOT)} reads the environment itself: {found}"
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        lits = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                and n.value in names and id(n) not in docstrings]
        assert not lits, f"{path.relative_to(ROOT)} spells {lits}: use upg_kernels.settings"


def _imports(path):
    """The modules a file imports (relative imports keep their leading dots)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            out.add("." * n.level + (n.module or ""))
    return out


def test_settings_stay_light():
    """settings.py imports the standard library and the path names only; path_names.py imports
    nothing (so the settings never pull torch, triton or a module that reads them)."""
    assert _imports(ROOT / "upg_kernels" / "path_names.py") == set()
    assert _imports(ROOT / "upg_kernels" / "settings.py") == {"__future__", "os", "dataclasses", ".path_names"}
