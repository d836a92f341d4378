#!/usr/bin/env bash
# Creates .venv-verl (if missing): verl 0.9.1 with its own transformers pin (>=5.5.3,<5.11), upg-kernels and pytest,
# kept apart from .venv so the main environment keeps its versions. Used by .ci/run for the verl tests
# (tests/test_verl_*.py). Safe to run again (a stamp file skips reinstalls). torch==2.13.0 goes first (see
# setup_env.sh; UPG_TORCH_SPEC overrides it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UPG_VERL_VENV:-$ROOT/.venv-verl}"
PY="${PYTHON:-python3}"
VERL_SPEC="verl==0.9.1"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-verl] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.upg-installed"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_verl_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup-verl] installing $VERL_SPEC (first run takes a minute or two)"
  log="$(mktemp)"
  # shellcheck disable=SC2086
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
         && { "$VENV/bin/python" -c "import torch" 2>/dev/null \
              || "$VENV/bin/python" -m pip install -q ${UPG_TORCH_SPEC:-torch==2.13.0}; } \
         && "$VENV/bin/python" -m pip install -q "$VERL_SPEC" "pytest>=8" \
         && "$VENV/bin/python" -m pip install -q -e "$ROOT"; } >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "[setup-verl] install failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
  "$VENV/bin/python" -c "import verl, upg_kernels.integrations.verl" >/dev/null
  echo "$HASH" > "$STAMP"
fi
