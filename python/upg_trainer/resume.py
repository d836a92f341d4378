"""What ``--resume`` does with settings that differ from the run's ``config.yaml``.

A resumed run continues the recorded one: the weights, optimizer, LR scheduler, data order, RNG and
the method's state come from the latest checkpoint. A setting given now that differs from
``config.yaml`` is, by name:

* ``APPLIED``: honoured from the resumed step on (output and progress options, the number of steps,
  the LR schedule's shape, and settings that change how a step runs, not what it computes);
* ``IGNORED``: the checkpoint's value wins (the optimizer's hyperparameters live in its state); the
  run goes on with a warning that names each one;
* anything else (data, model, loss, rewards, sampling, batch sizes, seed, the method's section):
  refused, because one run would then mix two configurations while ``config.yaml`` records the first.
  Start a new run from the checkpoint's weights instead (``--model.path <ckpt>/model``).
"""
from __future__ import annotations

APPLIED = ("output.", "demo.", "train.max_steps", "train.schedule", "train.warmup_steps", "train.min_lr_ratio",
           "train.strategy", "train.activation_checkpointing", "model.device", "model.attn_implementation",
           "loss.backend", "rollout.engine", "rollout.batch_size", "rollout.gpu_memory_utilization",
           "rollout.max_model_len", "rollout.sleep_level")
IGNORED = {"train.lr": "the optimizer and LR scheduler state", "train.betas": "the optimizer state",
           "train.weight_decay": "the optimizer state", "ppo.critic_lr": "the critic's optimizer state"}

QUIET = ("command", "output.dir", "output.resume", "output.overwrite")  # where and how this invocation starts
# (a run directory may have been moved), not settings of the run


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def _applied(name: str) -> bool:
    return any(name == a or (a.endswith(".") and name.startswith(a)) for a in APPLIED)


def compare_settings(saved: dict, now: dict) -> tuple[dict, dict]:
    """``(applied, ignored)``: ``{name: (old, new)}`` of the settings that differ, or a ValueError naming
    every setting that a resume cannot honour. ``saved`` / ``now``: ``Config.to_dict()`` trees (a setting
    missing from ``saved``, e.g. written by an older version, is not compared)."""
    old, new = _flat(saved), _flat(now)
    applied, ignored, refused = {}, {}, []
    for name in new:
        if name in QUIET or name not in old or old[name] == new[name]:
            continue
        if _applied(name):
            applied[name] = (old[name], new[name])
        elif name in IGNORED:
            ignored[name] = (old[name], new[name])
        else:
            refused.append(f"{name}: {old[name]!r} -> {new[name]!r}")
    if refused:
        raise ValueError("--resume continues the run recorded in config.yaml, but these settings differ from "
                         "it: " + "; ".join(refused) + ". Resume with the recorded values, or start a new run "
                         "from the checkpoint's weights (--model.path <output.dir>/checkpoints/step-N/model "
                         "with another --output.dir)")
    return applied, ignored


def resumed_config(now: dict, ignored: dict) -> dict:
    """The run's config after a resume (what ``config.yaml`` then records): the applied changes, the
    recorded values of the ignored ones."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in now.items()}
    for name, (old, _new) in ignored.items():
        sec, _, key = name.partition(".")
        out[sec][key] = old
    return out


def describe(changes: dict, why: dict = None) -> str:
    return "; ".join(f"{n}: {o!r} -> {v!r}" + (f" (kept from {why[n]})" if why else "")
                     for n, (o, v) in changes.items())
