"""``import upg_kernels`` and the torch backend work on a machine without triton (issue 8 item 6).

A subprocess installs a meta-path finder that makes ``import triton`` fail like a missing package,
then uses the library on the CPU and checks that nothing imported triton."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys

    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())

    import torch
    import upg_kernels
    from upg_kernels import LossConfig, token_logprobs, unified_policy_loss
    from upg_kernels.integrations import FusedLinearGRPOLoss, linear_cross_entropy
    from upg_kernels.integrations import trl as _trl  # noqa: F401  (no TRL import either)
    from upg_kernels.kernels import meta as _meta      # noqa: F401  (must stay triton-free)

    torch.manual_seed(0)
    N, H, V = 6, 8, 11
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[2] = -100
    for backend in ("torch", "auto"):
        logp, ent = token_logprobs(h, w, t, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        ref = torch.log_softmax(h.detach() @ w.detach().T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
        assert torch.allclose(logp.detach()[t != -100], ref[t != -100], atol=1e-5)

    B, T = 2, 3
    hb = torch.randn(B, T, H, requires_grad=True)
    tb = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    out = unified_policy_loss(hb, w, tb, config=LossConfig.preset("grpo"), loss_mask=mask,
                              advantages=torch.tensor([1.0, -1.0]), backend="auto")
    out.loss.backward()
    assert torch.isfinite(hb.grad).all()
    assert torch.isfinite(linear_cross_entropy(hb.detach(), w.detach(), tb))

    try:
        token_logprobs(h, w, t, backend="triton")
    except ImportError as e:
        assert "needs the triton package" in str(e), e
    else:
        raise AssertionError("backend='triton' without triton did not raise")
    assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), \\
        sorted(m for m in sys.modules if m.startswith("triton"))
    print("OK")
""")


def test_import_and_torch_backend_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.pop("UPG_KERNELS_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
