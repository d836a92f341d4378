#!/usr/bin/env bash
# Creates .venv (if missing) and installs upg-kernels with the trainer and dev extras.
# Sourced by run.sh, test.sh and scripts/aot_check.sh (it activates the venv); safe to run again (a stamp
# file skips reinstalls). The shared steps (venv, stamp, torch first, quiet pip) are scripts/venv_common.sh.
#
# torch is installed first and pinned (torch==2.13.0): a bare `torch` requirement reaching pip first
# pulls a multi-GB CUDA build. On this project's CPU machines that pin resolves to a local CPU wheel;
# elsewhere set UPG_TORCH_SPEC, e.g.
#   UPG_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"   (CPU build)
#   UPG_TORCH_SPEC="torch"                                                           (your CUDA build)
# UPG_VENV overrides the venv's path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=venv_common.sh
. "$ROOT/scripts/venv_common.sh"
VENV="${UPG_VENV:-$ROOT/.venv}"

upg_main_install() {
  pip_quiet install -q -e "$ROOT[trainer,dev]"
}
venv_setup setup "$VENV" "$ROOT/scripts/setup_env.sh" "installing (first run takes a few minutes)" \
  "import torch, triton, upg_kernels, upg_trainer" upg_main_install
# shellcheck disable=SC1091
. "$VENV/bin/activate"
