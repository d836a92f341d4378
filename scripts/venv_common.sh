# What the venv set-up scripts share (setup_env.sh, setup_verl_env.sh, setup_vllm_env.sh): sourced by
# them, never run. Each script keeps only what differs (its venv path, its requirements, its checks) and
# calls
#
#   venv_setup TAG VENV SCRIPT MESSAGE CHECK STEPS
#
# which
#   1. creates the virtual environment VENV with ${PYTHON:-python3} when VENV/bin/python is missing;
#   2. skips the rest when the stamp file VENV/.upg-installed holds the hash of pyproject.toml, SCRIPT
#      (the calling script: its requirements) and this file: a changed requirement re-installs;
#   3. otherwise prints "[TAG] MESSAGE", upgrades pip, installs torch first unless the venv already
#      imports it (${UPG_TORCH_SPEC:-torch==2.13.0}: a bare `torch` requirement reaching pip first pulls
#      a multi-GB CUDA build; on this project's CPU machines the pin resolves to a local CPU wheel; the
#      variable may carry pip options, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"),
#      runs the caller's function STEPS (its installs, through pip_quiet), runs `python -c CHECK` in the
#      venv (an import check) and writes the stamp.
#
# Every pip call goes through pip_quiet: its output is hidden, but shown (with the failed command) on
# failure, and the script stops (the callers run under set -euo pipefail). The caller sets ROOT (the
# repository root); venv_setup sets VENV_PY (the venv's python) and VENV_TAG for the steps.

pip_quiet() {   # pip in the venv ($VENV_PY), its noise hidden; its output shown and status 1 on failure
  local log
  log="$(mktemp)"
  if ! "$VENV_PY" -m pip "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "[$VENV_TAG] 'pip $*' failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
}

venv_setup() {   # TAG VENV SCRIPT MESSAGE CHECK STEPS (see the header)
  local venv="$2" script="$3" message="$4" check="$5" steps="$6" stamp hash
  VENV_TAG="$1"
  VENV_PY="$venv/bin/python"
  if [ ! -x "$VENV_PY" ]; then
    echo "[$VENV_TAG] creating virtual environment in $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  stamp="$venv/.upg-installed"
  hash="$(cat "$ROOT/pyproject.toml" "$script" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
    return 0
  fi
  echo "[$VENV_TAG] $message"
  pip_quiet install -q --upgrade pip
  if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
    # word splitting on purpose: UPG_TORCH_SPEC may carry pip options
    # shellcheck disable=SC2086
    pip_quiet install -q ${UPG_TORCH_SPEC:-torch==2.13.0}
  fi
  "$steps"
  "$VENV_PY" -c "$check" >/dev/null
  echo "$hash" > "$stamp"
}
