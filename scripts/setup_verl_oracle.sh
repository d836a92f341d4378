#!/usr/bin/env bash
# Optional oracle: builds .venv-verl on top of .venv (whose site-packages it reuses through a .pth file)
# with verl 0.9.1 and the few modules `verl.trainer.ppo.core_algos` imports, so that
#   .venv-verl/bin/python -m pytest tests/test_ppo_value.py -k verl
# checks gae / whiten / value_loss / the KL pieces against verl's own functions. Not part of CI (ray is
# large); those tests skip where verl is not importable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
OV="$ROOT/.venv-verl"
if [ ! -x "$OV/bin/python" ]; then
  python -m venv "$OV"
fi
SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
OSITE="$("$OV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SITE" > "$OSITE/upg-main-venv.pth"
"$OV/bin/python" -m pip install -q --no-deps verl==0.9.1 omegaconf tensordict ray msgpack protobuf requests \
  urllib3 certifi charset-normalizer idna jsonschema jsonschema-specifications attrs referencing rpds-py \
  pyvers cloudpickle codetiming orjson 2>&1 | grep -v "^WARNING: Location" || true
PYTHONPATH="$ROOT:$ROOT/python" "$OV/bin/python" -c "import verl.trainer.ppo.core_algos" \
  && echo "[verl-oracle] ready: .venv-verl/bin/python -m pytest tests/test_ppo_value.py -k verl"
