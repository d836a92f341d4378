"""The project speaks of itself: no file refers to design notes or documents outside the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\bDESIGN\b|\b[Ss]eeds?[ _]?0\d\d\b|\.\./shared/")


def test_no_reference_to_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        if f.endswith((".whl", ".png", ".json")) or f == "tests/test_docs_refs.py" or f.startswith("tests/peer_suites/"):
            continue
        text = (ROOT / f).read_text(errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_design_doc_exists_and_is_linked():
    assert (ROOT / "docs" / "design.md").exists()
    assert "docs/design.md" in (ROOT / "README.md").read_text()
