"""The wheel holds what a user installs and nothing else: the library, the trainer with its assets, the
license; not the benchmark package (bench/ runs from a checkout) and its tests."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("upg_kernels", "python", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = tmp_path.glob("upg_kernels-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"upg_kernels", "upg_trainer"}, top
    assert not any("/test_" in n or n.startswith("tests/") for n in names)
    assert any(n.endswith("dist-info/licenses/LICENSE") for n in names)
    assert "upg_trainer/assets/tokenizer.json" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(whl).read(entry).decode()
    assert "upg-train = upg_trainer.cli:main" in scripts and "bench" not in scripts


def test_license_file_matches_declared_license():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
