#!/usr/bin/env bash
# The main job: sets itself up, then trains SFT, GRPO and HPT on the embedded task (CPU, <10 min).
# Extra arguments go to `upg-train demo` (try: bash run.sh --help).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec upg-train demo "$@"
