"""What a training method of ``upg-train`` is (``Method``), and what the ``Trainer`` gives it.

A method is one class: its class attributes describe it to the command line and the config (name,
help, config sections and defaults, data columns, whether it samples rollouts and needs rewards), its
class methods check a config, and an instance (built by the ``Trainer``, ``method.tr``) sets up what
the method alone owns (a critic, a replay sampler, a preference config), runs one training step and
saves / restores its state in the checkpoints.

The trainer's services a method uses (``python/upg_trainer/trainer.py``):

* state: ``cfg``, ``lm`` (the plain model), ``model`` (wrapped for ddp/fsdp2), ``tok``, ``device``,
  ``softcap``, ``ref`` / ``ref_softcap`` (the frozen reference or None), ``engine`` (rollouts),
  ``train_rows`` / ``sampler`` (the training data and its order), ``rewards``, ``loss_cfg``, ``step``;
* ``update(micro, loss_of=None, ...)``: one optimizer update over micro-batches (default loss: the
  unified policy loss, ``policy_loss_of``);
* ``fill_logprobs``, ``prompt_ids``, ``split``, ``pad_batch``, ``columns_of``.
"""
from __future__ import annotations

from typing import ClassVar


class Method:
    """One ``upg-train`` command that trains (or, for ``eval``, only evaluates) a model."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    sections: ClassVar[tuple[str, ...]] = ()   # config sections only this method reads (its --help shows them)
    defaults: ClassVar[dict] = {}              # per-method config defaults, applied before the YAML file
    loss_preset: ClassVar[str] = ""            # default unified_policy_loss preset ('' = not trained with it)
    columns: ClassVar[tuple[str, ...]] = ()    # DataConfig fields naming the columns a training row needs
    trains: ClassVar[bool] = True              # False: evaluation only (no optimizer steps, no output run)
    rollouts: ClassVar[bool] = False           # samples completions in its steps (loss at rollout.temperature)
    needs_reward: ClassVar[bool] = False       # reward functions score its rollouts
    generates: ClassVar[bool] = True           # builds a rollout engine (rollouts or greedy evaluation)
    logprobs: ClassVar[bool] = True            # the model is asked for token log-probs (a language model)
    one_update: ClassVar[bool] = True          # one optimizer update per step (train.mini_batches must be 1)
    single_process: ClassVar[bool] = False     # not yet run under torchrun
    batch_unit: ClassVar[str] = "samples"      # what train.batch_size counts (error messages)

    def __init__(self, trainer):
        self.tr = trainer
        self.cfg = trainer.cfg

    # ----------------------------------------------------------------------------- config time
    @classmethod
    def validate(cls, cfg) -> None:
        """Config checks of this method (``config.validate`` calls it); raise ValueError."""
        if cls.one_update and cfg.train.mini_batches != 1:
            from . import METHODS
            multi = "/".join(n for n, m in METHODS.items() if not m.one_update and m.trains)
            raise ValueError(f"train.mini_batches is for {multi} (updates per rollout batch); {cls.name} makes "
                             "one update per step: leave it at 1 and use train.batch_size / train.grad_accum")
        if cfg.data.replay_path and cls.name != "sft":
            raise ValueError(f"data.replay_path is SFT replay: it is used by `upg-train sft`, not {cls.name!r}")

    @classmethod
    def check_loss(cls, lc, preset: str) -> None:
        """Refuse a LossConfig this method cannot train with (``trainer.make_loss_config``)."""

    @classmethod
    def completion_limit(cls, cfg) -> int:
        """The longest completion it trains on (the Dr.GRPO ``max_completion_length`` default)."""
        return int(cfg.rollout.max_new_tokens if cls.rollouts else cfg.data.max_completion_tokens)

    # ----------------------------------------------------------------------------- build time
    def load_model(self):
        """``(model, tokenizer, device)``, or None for the trainer's causal LM (``model.path``)."""
        return None

    def load_data(self) -> None:
        """Set ``tr.train_rows`` (checked for ``columns``) and ``tr.sampler``."""
        from ..data import PromptSampler, check_columns, load_rows
        if not self.trains:
            return
        tr, d = self.tr, self.cfg.data
        tr.train_rows = load_rows(d.path, split=d.split, num=d.num_train if d.path == "embedded" else None,
                                  seed=self.cfg.train.seed, levels=d.levels)
        check_columns(tr.train_rows, [getattr(d, c) for c in self.columns], d.path, f"`upg-train {self.name}`")
        tr.sampler = PromptSampler(len(tr.train_rows), self.cfg.train.seed)

    def eval_path(self) -> str:
        """The held-out set of greedy-accuracy evaluation ('' = none); ``data.eval_path='auto'``: the
        embedded task's held-out set when training on the embedded task."""
        d = self.cfg.data
        if d.eval_path == "auto":
            return "embedded" if d.path == "embedded" else ""
        return d.eval_path

    def needs_reference(self) -> bool:
        """A frozen reference model: the loss's KL term or chi2/hellinger likelihood."""
        lc = self.tr.loss_cfg
        return lc is not None and (lc.kl_coef > 0 or lc.likelihood in ("chi2", "hellinger"))

    def setup(self) -> None:
        """What only this method owns, built after the reference and before a resume loads weights."""

    def load_weights(self, sd: dict, path: str) -> None:
        """Load a checkpoint's model state into the plain model (resume)."""
        from ..checkpoint import load_model_weights
        load_model_weights(self.tr.lm, sd, path)

    # ----------------------------------------------------------------------------- run time
    def step(self) -> dict:
        """One training step (its optimizer update(s) through ``tr.update``); returns its metrics."""
        raise NotImplementedError

    def has_eval(self) -> bool:
        """Whether ``evaluate`` has a held-out set of its own."""
        return False

    def evaluate(self) -> dict:
        """Metrics of this method's own held-out evaluation (beside greedy accuracy); {} = none."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold beyond the model, optimizer, scheduler, data order and RNG."""
        return {}

    def load_state_dict(self, st: dict) -> None:
        pass

    def save_model(self, path: str, sd: dict, final: bool = False) -> None:
        """The model as a from_pretrained directory with its tokenizer (checkpoints and ``final/``)."""
        self.tr.lm.save_pretrained(path, state_dict=sd)
        self.tr.tok.save_pretrained(path)
