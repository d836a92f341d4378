#!/usr/bin/env bash
# Ahead-of-time compile check of every registered Triton kernel variant (python -m upg_kernels.aot_check),
# with two triton versions, on a machine without a GPU:
#   * triton 3.6.0 (the version on this project's GPU machines), installed once into .venv-triton36/
#     with `pip --target` (the venv is not touched; torch keeps its own triton pin), for AOT_ARCHS_36;
#   * the venv's triton (3.9), for AOT_ARCHS_VENV.
# Both default to sm_80,sm_90. Compiles run in AOT_JOBS processes (default: the CPU count).
# Extra arguments go to both runs (e.g. --only _fwd_kernel; not --json). Exits non-zero when either
# run fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then   # an active venv is used as it is (else the project's .venv)
  # shellcheck disable=SC1091
  source "$ROOT/scripts/setup_env.sh"
fi
cd "$ROOT"
T36="${UPG_TRITON36_DIR:-$ROOT/.venv-triton36}"
ARCHS_36="${AOT_ARCHS_36:-sm_80,sm_90}"
ARCHS_VENV="${AOT_ARCHS_VENV:-sm_80,sm_90}"
JOBS="${AOT_JOBS:-$(nproc 2>/dev/null || echo 2)}"
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "$T36/triton/__init__.py" ]; then
  echo "[aot] installing triton==3.6.0 into $T36 (no deps; the venv is untouched)"
  python -m pip install -q --no-deps --target "$T36" triton==3.6.0
fi

status=0
echo "[aot] triton $(python -c 'import triton; print(triton.__version__)') (venv): $ARCHS_VENV"
python -m upg_kernels.aot_check --arch "$ARCHS_VENV" --jobs "$JOBS" "$@" || status=1
echo "[aot] triton 3.6.0 ($T36): $ARCHS_36"
PYTHONPATH="$T36:$PYTHONPATH" python - <<'PY'
import torch, triton
assert triton.__version__ == "3.6.0", f"expected triton 3.6.0 first on the path, got {triton.__version__} at {triton.__file__}"
print(f"[aot] torch {torch.__version__} imports with triton {triton.__version__} from {triton.__file__}")
PY
PYTHONPATH="$T36:$PYTHONPATH" python -m upg_kernels.aot_check --arch "$ARCHS_36" --jobs "$JOBS" "$@" || status=1
exit $status
