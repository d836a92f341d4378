"""Every Python block of README.md runs as written (a user pastes them)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert _blocks()


def test_readme_python_blocks_run(tmp_path):
    for i, code in enumerate(_blocks()):
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
        assert r.returncode == 0, f"README block {i} failed:\n{code}\n{r.stderr[-3000:]}"
        assert r.stdout.strip(), f"README block {i} printed nothing"
        assert "Warning" not in r.stderr, r.stderr
