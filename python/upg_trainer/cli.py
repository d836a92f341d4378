"""``upg-train``: the reference trainer's command line (a sub-command per method of ``methods/``,
plus ``demo``).

Every option of the config tree (``config.py``) is a ``--section.field VALUE`` flag; ``--config
FILE.yaml`` sets any of them from a file (same nesting), and flags override the file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

TRAINER_EXTRA = "pip install 'upg-kernels[trainer]'"
# the [trainer] extra's modules that the command line needs before it can say anything else
EXTRA_MODULES = {"yaml": "pyyaml", "transformers": "transformers", "safetensors": "safetensors", "tqdm": "tqdm"}

DEMO_HELP = ("the embedded task end to end on CPU: SFT warm-up, then SFT vs GRPO vs HPT, table + PNG; "
             "--demo.suite preference: SFT -> DPO and SFT -> RM -> PPO")

EPILOG = """\
examples:
  upg-train demo                                    # ~2 min on an idle 2-core CPU (README), writes runs/demo/
  upg-train sft  --train.max_steps 200              # the embedded task, tiny model
  upg-train grpo --model.path runs/sft/final --loss.preset dr_grpo
  upg-train hpt  --config my_hpt.yaml --train.lr 5e-6 --hpt.gamma 0
  upg-train hpt  --config my_hpt.yaml --resume      # continue the run in output.dir
  upg-train eval --model.path runs/hpt/final
  upg-train dpo  --model.path runs/sft/final --pref.preset dpo --pref.overrides "{beta: 0.1}"
  upg-train rm   --data.path pairs.jsonl       # prompt/chosen/rejected columns
  upg-train ppo  --model.path runs/sft/final --reward.funcs "[rm:runs/rm/final]"
  upg-train demo --suite preference            # SFT -> DPO, SFT -> RM -> PPO

data: a .jsonl/.json/.parquet file or a datasets save_to_disk directory with the columns
  data.prompt_column (default 'prompt'), data.answer_column ('answer'), data.demo_column
  ('demonstration'); 'embedded' = the generated arithmetic task. See docs/trainer.md.
"""


def _type_name(v) -> str:
    if isinstance(v, bool):
        return "BOOL"
    if isinstance(v, int):
        return "INT"
    if isinstance(v, float):
        return "FLOAT"
    if isinstance(v, list):
        return "LIST"
    if isinstance(v, dict):
        return "MAP"
    return "STR"


def _missing_extra() -> list[str]:
    """Distributions of the ``[trainer]`` extra whose modules cannot be imported."""
    out = []
    for mod, dist in EXTRA_MODULES.items():
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(dist)
        except ImportError:
            out.append(dist)
    return out


def commands() -> dict[str, str]:
    """Every sub-command and its help: the methods' (``methods.METHODS``), then ``demo``."""
    from .methods import METHODS
    return {**{name: m.help for name, m in METHODS.items()}, "demo": DEMO_HELP}


def _shows(command: str, section: str) -> bool:
    """A method's --help shows the shared sections and its own (``Method.sections``); demo shows all."""
    from .methods import METHODS
    if command == "demo":
        return True
    if section == "demo":
        return False
    owned = {s for m in METHODS.values() for s in m.sections}
    return section not in owned or section in METHODS[command].sections


def _add_options(p: argparse.ArgumentParser, command: str) -> None:
    from .config import SECTIONS, build_config, section_fields
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options below "
                   "(nested: 'train: {lr: 1e-4}'); command-line flags override it")
    p.add_argument("--resume", action="store_true", help="same as --output.resume true")
    p.add_argument("--overwrite", action="store_true", help="same as --output.overwrite true")
    defaults = build_config(command)
    if command == "demo":
        p.add_argument("--suite", dest="demo.suite", choices=["main", "preference"], default=argparse.SUPPRESS,
                       help="same as --demo.suite: main (SFT vs GRPO vs HPT) or preference (SFT -> DPO, "
                            "SFT -> RM -> PPO)")
    for sec in SECTIONS:
        if not _shows(command, sec):
            continue
        g = p.add_argument_group(f"{sec} options")
        for f in section_fields(sec):
            cur = getattr(getattr(defaults, sec), f.name)
            shown = json.dumps(cur) if isinstance(cur, (list, dict)) else cur
            g.add_argument(f"--{sec}.{f.name}", dest=f"{sec}.{f.name}", metavar=_type_name(cur),
                           default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%"))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upg-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reference trainer of upg-kernels: SFT, GRPO, HPT, RM, DPO and PPO on any transformers causal LM, "
                    "trained through upg_kernels.unified_policy_loss (decoder hidden states + lm_head "
                    "weight; the vocab-sized logits are never materialised).\n\ncommands:\n" +
                    "\n".join(f"  {k:<5} {v}" for k, v in commands().items()) +
                    "\n\nRun `upg-train COMMAND --help` for every option of a command.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, desc in commands().items():
        sp = sub.add_parser(name, help=desc, description=desc, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_options(sp, name)
    return parser


def parse_config(argv=None):
    from .config import build_config
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        raise SystemExit(2)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    if args.resume:
        flags["output.resume"] = "true"
    if args.overwrite:
        flags["output.overwrite"] = "true"
    try:
        return build_config(args.command, args.config, flags)
    except ValueError as e:
        parser.exit(2, f"upg-train {args.command}: error: {e}\n")


def main(argv=None) -> int:
    missing = _missing_extra()
    if missing:
        print(f"upg-train needs the trainer's dependencies, which are not installed ({', '.join(missing)}): "
              f"{TRAINER_EXTRA}", file=sys.stderr)
        return 1
    cfg = parse_config(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    from .methods import get_method
    try:
        if cfg.command == "demo":
            from .demo import run_demo
            run_demo(cfg)
        elif not get_method(cfg.command).trains:  # eval
            from .trainer import Trainer
            tr = Trainer(cfg)
            m = tr.evaluate()
            os.makedirs(cfg.output.dir, exist_ok=True)
            with open(os.path.join(cfg.output.dir, "eval.json"), "w") as f:
                json.dump(m, f, indent=2)
            for k, v in m.items():
                print(f"{k:24s} {v:.4f}")
        else:
            from .trainer import Trainer
            tr = Trainer(cfg)
            tr.train()
            print(f"[upg-train] done: {cfg.output.dir}/metrics.jsonl, plots.png, final/")
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"upg-train {cfg.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
