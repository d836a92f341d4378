"""``upg-train eval``: greedy accuracy of a model on a held-out set; no training."""
from __future__ import annotations

from .base import Method


class Eval(Method):
    name = "eval"
    help = "greedy accuracy of a model (model.path) on the held-out set (data.eval_path)"
    defaults = {"output": {"dir": "runs/eval"}}
    trains = False
    one_update = False

    def eval_path(self):
        d = self.cfg.data
        return "embedded" if d.eval_path == "auto" else d.eval_path
