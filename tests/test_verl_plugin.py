"""The plugin loads through verl 0.9.1's own mechanisms (a fresh interpreter each: verl loads plugins at import).

* the ``verl.plugins`` entry point that pyproject.toml declares (named in ``VERL_USE_EXTERNAL_PLUGINS``; verl's
  default ``auto`` loads every entry point of the group), and ``VERL_USE_EXTERNAL_MODULES=upg_kernels.integrations.verl``;
* with both turned off, nothing is registered (so the checks above can fail).
"""
import os
import subprocess
import sys

import pytest

if os.environ.get("UPG_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl", reason="verl 0.9.1 is not installed in this venv; .ci/run runs these tests "
                                       "in .venv-verl")

pytestmark = pytest.mark.verl

PROBE = """
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
import verl.models.transformers.monkey_patch as mp
import verl.utils.kernel.linear_cross_entropy as lce
import verl.workers.utils.losses as losses
print(sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("upg_")))
print(hasattr(mp.patch_forward_with_backends, "_upg_original"), hasattr(lce.linear_cross_entropy, "_upg_original"),
      hasattr(losses.ppo_loss, "_upg_original"))
"""


def _probe(**env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    names, flags = res.stdout.strip().splitlines()[-2:]
    return eval(names), flags  # noqa: S307 - our own probe's repr output


@pytest.mark.parametrize("env", [dict(VERL_USE_EXTERNAL_PLUGINS="upg_kernels"),
                                 dict(VERL_USE_EXTERNAL_PLUGINS="none",
                                      VERL_USE_EXTERNAL_MODULES="upg_kernels.integrations.verl")],
                         ids=["entry-point", "external-modules"])
def test_plugin_loads(env):
    from upg_kernels.integrations.verl import VERL_PRESETS

    names, flags = _probe(**env)
    assert names == sorted(f"upg_{p}" for p in VERL_PRESETS)
    assert flags == "True True True"   # kernel backend, its dispatcher, the engine-loss (ppo_loss) router


def test_nothing_without_the_plugin():
    names, flags = _probe(VERL_USE_EXTERNAL_PLUGINS="none")
    assert names == [] and flags == "False False False"
