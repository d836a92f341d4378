"""The custom ops live in one public module (upg_kernels/ops.py); no module imports a private name
(``_x``) from another module of the library or the bench (other projects' privates are theirs)."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

from upg_kernels import ops

ROOT = Path(__file__).resolve().parents[1]


def test_every_op_of_the_namespace_is_in_ops():
    for name in ("token_logprobs", "token_logprobs_backward", "fused_policy_epilogue"):
        assert hasattr(torch.ops.upg_kernels, name)
    mine = {getattr(ops, n)._qualname for n in dir(ops) if n.endswith("_op")}
    assert mine == {"upg_kernels::token_logprobs", "upg_kernels::token_logprobs_backward",
                    "upg_kernels::fused_policy_epilogue"}
    for path in (ROOT / "upg_kernels").rglob("*.py"):
        if path.name != "ops.py":
            assert "custom_op(" not in path.read_text(), f"{path} defines a custom op outside ops.py"


def test_no_private_imports_across_modules():
    for path in list((ROOT / "upg_kernels").rglob("*.py")) + list((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            ours = isinstance(node, ast.ImportFrom) and (
                node.level > 0 or (node.module or "").split(".")[0] in ("upg_kernels", "bench"))
            if ours:
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.relative_to(ROOT)} imports private {private} from {node.module}"


def test_check_target_range_names_the_id():
    t = torch.tensor([0, 3, -100, 7])
    ops.check_target_range(t, 8, -100)
    try:
        ops.check_target_range(t, 5, -100)
    except ValueError as e:
        assert "id 7 at flat position 3" in str(e)
    else:
        raise AssertionError("no error for an id outside [0, V)")
