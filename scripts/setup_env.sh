#!/usr/bin/env bash
# Creates .venv (if missing) and installs upg-kernels with the trainer and dev extras.
# Sourced by run.sh and test.sh; safe to run again (a stamp file skips reinstalls).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UPG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.upg-installed"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing (first run takes a few minutes)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # Install torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  # Override with UPG_TORCH_SPEC (e.g. UPG_TORCH_SPEC="torch" on a CUDA machine).
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${UPG_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  python -m pip install -q -e "$ROOT[trainer,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch, triton, upg_kernels, upg_trainer" >/dev/null
  echo "$HASH" > "$STAMP"
fi
