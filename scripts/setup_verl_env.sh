#!/usr/bin/env bash
# Creates .venv-verl (if missing): verl 0.9.1 with its own transformers pin (>=5.5.3,<5.11), upg-kernels and pytest,
# kept apart from .venv so the main environment keeps its versions. Used by .ci/run for the verl tests
# (tests/test_verl_*.py). Safe to run again (a stamp file skips reinstalls). torch==2.13.0 goes first
# (scripts/venv_common.sh, the steps all set-up scripts share; UPG_TORCH_SPEC overrides it).
# UPG_VERL_VENV overrides the venv's path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=venv_common.sh
. "$ROOT/scripts/venv_common.sh"
VENV="${UPG_VERL_VENV:-$ROOT/.venv-verl}"
VERL_SPEC="verl==0.9.1"

verl_install() {
  pip_quiet install -q "$VERL_SPEC" "pytest>=8"
  pip_quiet install -q -e "$ROOT"
}
venv_setup setup-verl "$VENV" "$ROOT/scripts/setup_verl_env.sh" \
  "installing $VERL_SPEC (first run takes a minute or two)" "import verl, upg_kernels.integrations.verl" verl_install
