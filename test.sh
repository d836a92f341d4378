#!/usr/bin/env bash
# The test suite: sets itself up, then runs pytest (Triton kernels under TRITON_INTERPRET=1 on CPU).
# Extra arguments go to pytest (e.g. bash test.sh -k logprobs -x).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
