#!/usr/bin/env bash
# Creates .venv (if missing) and installs upg-kernels with the trainer and dev extras.
# Sourced by run.sh and test.sh; safe to run again (a stamp file skips reinstalls).
#
# torch is installed first and pinned (torch==2.13.0): a bare `torch` requirement reaching pip first
# pulls a multi-GB CUDA build. On this project's CPU machines that pin resolves to a local CPU wheel;
# elsewhere set UPG_TORCH_SPEC, e.g.
#   UPG_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"   (CPU build)
#   UPG_TORCH_SPEC="torch"                                                           (your CUDA build)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UPG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

pip_quiet() {   # pip with its noise hidden, but its output shown (and the script stopped) on failure
  local log
  log="$(mktemp)"
  if ! python -m pip "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "[setup] 'pip $*' failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
}

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
  pip_quiet install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    # word splitting on purpose: UPG_TORCH_SPEC may carry pip options
    # shellcheck disable=SC2086
    pip_quiet install -q ${UPG_TORCH_SPEC:-torch==2.13.0}
  fi
  pip_quiet install -q -e "$ROOT[trainer,dev]"
  python -c "import torch, triton, upg_kernels, upg_trainer" >/dev/null
  echo "$HASH" > "$STAMP"
fi
