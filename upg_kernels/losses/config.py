"""``LossConfig``: one post-training loss as the four parts of the Unified Policy Gradient Estimator.

    grad = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta                (docs/design.md §1)

A config names the four parts (``stabilization``, ``reference``, ``advantage``, ``likelihood``)
plus how per-token losses are aggregated and the optional extra terms (KL, entropy, rollout
importance correction). Every preset is one row of :data:`PRESETS` -- data, not a code path --
and ``docs/losses.md`` mirrors that table (a test checks they agree).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Optional

STABILIZATIONS = ("none", "clip", "seq_clip", "cispo", "sapo", "vespo")
REFERENCES = ("current", "old", "one", "shaped")
ADVANTAGES = ("one", "given", "mean_std", "mean", "rloo", "batch_std")
GROUP_ADVANTAGES = ("mean_std", "mean", "rloo", "batch_std")
LIKELIHOODS = ("logp", "dft", "chi2", "hellinger")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
KL_TYPES = ("k1", "k2", "k3")
ROLLOUT_IS = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DEMO_PARTS = (None, "sft", "shaped")


@dataclass(frozen=True)
class LossConfig:
    """A post-training loss as data. Field names are a stable API (integrations build on them).

    The four UPGE parts (they apply to the *main* rows: every row not marked ``is_demo``):

    - ``stabilization``: ``"none"``; ``"clip"`` (PPO token clip ``-min(r A, clip(r) A)``, with the
      optional ``delta`` upper cap on ``r`` and the optional ``dual_clip`` c for ``A < 0``);
      ``"seq_clip"`` (GSPO: the clip on the sequence ratio; implies ``ratio_level="sequence"``);
      ``"cispo"`` (``-sg(min(r, eps_high)) A logp``: no min, clipped tokens keep their gradient);
      ``"sapo"`` (soft gate ``-(4/tau) sigmoid(tau (r - 1)) A``, ``tau_pos``/``tau_neg``);
      ``"vespo"`` (``-sg(phi(w_i)) A logp`` with VESPO's gamma weight ``phi(w) = e^lam w^k e^(-lam w)`` of
      the sequence ratio ``w_i = exp(sum_t m (logp - old))``, ``vespo_k_*``/``vespo_lambda_*``).
      Everything but ``"none"`` needs ``reference="old"``.
    - ``reference`` (the denominator ``pi_ref``): ``"current"`` (``pi_theta``: gradient of log pi,
      SFT/REINFORCE, the loss is ``-A * likelihood(logp)``); ``"old"`` (``pi_old``: the ratio
      ``r = exp(logp - old)``, PPO/GRPO); ``"one"`` (offline gradient of pi: ``-A * p``);
      ``"shaped"`` (LUFFY ``-A * p / (p + shaping_gamma)``).
    - ``advantage``: ``"one"`` (A = 1, SFT), ``"given"`` (the caller's ``advantages``),
      ``"mean_std"`` (GRPO), ``"mean"`` (Dr.GRPO), ``"rloo"``, ``"batch_std"`` -- the group modes
      are computed from ``rewards`` with ``group_size``/``group_ids`` (see
      :func:`upg_kernels.group_advantages`), or taken from ``advantages`` when those are passed.
    - ``likelihood`` (only with ``reference="current"``): ``"logp"`` (NLL), ``"dft"``
      (``sg(p) * logp``), ``"chi2"`` / ``"hellinger"`` (the f-divergence SFT objectives with the
      implicit reward ``u = fdiv_beta * (logp - ref)``; docs/losses.md has the derivation).

    ``kl_bias_correction`` multiplies the KL term by the (unclamped, differentiable) ratio ``r`` (token or
    sequence level, as ``ratio_level``): ``kl_coef * kl * r`` (TRL/Liger ``use_bias_correction_kl``).

    Aggregation (``m`` the mask, over the main rows only): ``"token_mean"`` ``sum(l m)/sum(m)``
    (or ``/ num_items_in_batch`` when given: DAPO), ``"seq_mean_token_mean"`` (GRPO),
    ``"seq_mean_token_sum"``, ``"seq_mean_token_sum_norm"`` (Dr.GRPO ``sum(l m)/(B L_max)`` with
    ``L_max = max_completion_length``).

    Demonstration rows (``is_demo``) take ``demo_part``: ``"sft"`` (``demo_coef`` times the NLL
    aggregated by ``demo_aggregation``; HPT) or ``"shaped"`` (LUFFY's off-policy
    ``-A p/(p + shaping_gamma)``, aggregated by ``aggregation`` over the demo rows).
    The total is ``rl_coef * L_main + demo_coef * L_demo``. ``hpt_gamma`` is HPT's gate threshold,
    carried for trainers (P > hpt_gamma: RL rows, else the demonstration); the loss does not use it.
    """

    # the four parts
    stabilization: str = "none"
    reference: str = "current"
    advantage: str = "one"
    likelihood: str = "logp"
    # aggregation
    aggregation: str = "token_mean"
    max_completion_length: Optional[int] = None
    # ratio and its stabilization
    ratio_level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: Optional[float] = None
    dual_clip: Optional[float] = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    # VESPO gamma weight phi(w) = exp(lam + k log w - lam w) (phi(1) = 1); *_pos for A >= 0, *_neg for A < 0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # advantage estimation from rewards
    adv_eps: float = 1e-4
    # extra terms
    kl_type: str = "k3"
    kl_coef: float = 0.0
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    # rollout (sampler vs trainer) importance correction
    rollout_is: Optional[str] = None
    rollout_is_cap: float = 2.0
    # likelihood transforms / reference shaping
    fdiv_beta: float = 0.1
    shaping_gamma: float = 0.1
    # demonstration rows (HPT / LUFFY) and part weights
    demo_part: Optional[str] = None
    demo_coef: float = 1.0
    demo_aggregation: str = "token_mean"
    rl_coef: float = 1.0
    # HPT gate, carried as data for trainers (the loss itself takes is_demo): a prompt trains with
    # RL when the pass rate P of its rollouts is > hpt_gamma, else with SFT on its demonstration
    hpt_gamma: Optional[float] = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {list(allowed)}, got {v!r}")

        def number(name, *, positive=False, nonneg=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"LossConfig.{name} must be a finite number, got {v!r}")
            if positive and not v > 0:
                raise ValueError(f"LossConfig.{name} must be > 0, got {v!r}")
            if nonneg and not v >= 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {v!r}")

        choice("stabilization", STABILIZATIONS)
        choice("reference", REFERENCES)
        choice("advantage", ADVANTAGES)
        choice("likelihood", LIKELIHOODS)
        choice("aggregation", AGGREGATIONS)
        choice("demo_aggregation", AGGREGATIONS)
        choice("ratio_level", RATIO_LEVELS)
        choice("kl_type", KL_TYPES)
        choice("rollout_is", ROLLOUT_IS)
        choice("demo_part", DEMO_PARTS)
        for n in ("eps_low", "eps_high", "adv_eps", "kl_coef", "entropy_coef", "demo_coef", "rl_coef"):
            number(n, nonneg=True)
        for n in ("tau_pos", "tau_neg", "rollout_is_cap", "fdiv_beta", "shaping_gamma"):
            number(n, positive=True)
        for n in ("vespo_k_pos", "vespo_k_neg"):
            number(n, nonneg=True)
        for n in ("vespo_lambda_pos", "vespo_lambda_neg"):
            number(n, positive=True)
        if not isinstance(self.kl_bias_correction, bool):
            raise ValueError(f"LossConfig.kl_bias_correction must be a bool, got {self.kl_bias_correction!r}")
        if self.kl_bias_correction and self.reference != "old":
            raise ValueError("LossConfig.kl_bias_correction multiplies the KL term by the ratio pi/pi_old and "
                             f"needs reference='old', got reference={self.reference!r}")
        number("delta", positive=True, optional=True)
        number("dual_clip", positive=True, optional=True)
        number("hpt_gamma", nonneg=True, optional=True)
        if self.hpt_gamma is not None and self.hpt_gamma >= 1:
            raise ValueError(f"LossConfig.hpt_gamma is a pass-rate threshold in [0, 1), got {self.hpt_gamma!r}")
        # fields that only a demonstration part reads: refused where nothing would read them
        if self.demo_part is None and self.demo_coef != 1.0:
            raise ValueError(f"LossConfig.demo_coef={self.demo_coef!r} has no effect: demo_part is None (no "
                             "demonstration rows); use a preset with demonstrations (hpt, hpt_release, "
                             "luffy) or set demo_part")
        if self.hpt_gamma is not None and self.demo_part != "sft":
            raise ValueError(f"LossConfig.hpt_gamma={self.hpt_gamma!r} is HPT's gate between RL and SFT on "
                             f"demonstrations and needs demo_part='sft' (hpt, hpt_release), got "
                             f"demo_part={self.demo_part!r}")
        if self.stabilization == "seq_clip":
            object.__setattr__(self, "ratio_level", "sequence")
        if self.stabilization != "none" and self.reference != "old":
            raise ValueError(f"LossConfig.stabilization={self.stabilization!r} acts on the ratio "
                             f"pi/pi_old and needs reference='old', got reference={self.reference!r}")
        if self.ratio_level == "sequence" and self.stabilization in ("cispo", "sapo", "vespo"):
            raise ValueError(f"LossConfig.ratio_level='sequence' is not supported with "
                             f"stabilization={self.stabilization!r} (token level only, as in TRL/Liger)")
        if self.stabilization == "vespo" and self.rollout_is is not None and self.rollout_is.startswith("sequence"):
            raise ValueError(f"LossConfig.stabilization='vespo' folds token-level rollout IS weights into its "
                             f"sequence weight; rollout_is={self.rollout_is!r} is not supported (use "
                             "'token_truncate' or 'token_mask', as TRL requires)")
        if self.ratio_level == "sequence" and self.reference != "old":
            raise ValueError("LossConfig.ratio_level='sequence' needs reference='old' (a sequence "
                             f"ratio pi/pi_old), got reference={self.reference!r}")
        if self.likelihood != "logp" and self.reference != "current":
            raise ValueError(f"LossConfig.likelihood={self.likelihood!r} transforms log pi and needs "
                             f"reference='current', got reference={self.reference!r}")
        if self.stabilization == "clip" or self.stabilization == "seq_clip":
            if self.eps_low >= 1:
                raise ValueError(f"LossConfig.eps_low must be < 1 for a clip at 1 - eps_low, "
                                 f"got {self.eps_low!r}")
        if self.stabilization == "cispo" and not self.eps_high > 0:
            raise ValueError("LossConfig.eps_high is CISPO's absolute cap eps_max and must be > 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"LossConfig.dual_clip must be > 1 (typically 3), got {self.dual_clip!r}")
        if self.max_completion_length is not None:
            v = self.max_completion_length
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LossConfig.max_completion_length must be a positive int or None, "
                                 f"got {v!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "LossConfig":
        """The config of preset ``name`` (a row of :data:`PRESETS`), with ``overrides`` applied."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        valid = field_names()
        bad = sorted(k for k in overrides if k not in valid)
        if bad:
            raise ValueError(f"unknown LossConfig field(s) {bad}; valid fields: {sorted(valid)}")
        kw = {k: v for k, v in PRESETS[name].items() if k != "description"}
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **changes) -> "LossConfig":
        """A copy with ``changes`` (validated like the constructor)."""
        valid = field_names()
        bad = sorted(k for k in changes if k not in valid)
        if bad:
            raise ValueError(f"unknown LossConfig field(s) {bad}; valid fields: {sorted(valid)}")
        return dataclasses.replace(self, **changes)

    @property
    def is_sequence_ratio(self) -> bool:
        return self.reference == "old" and self.ratio_level == "sequence"


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(LossConfig))


# ---------------------------------------------------------------------------------------------
# The preset table. One row per preset; the four parts first, then aggregation, then extras.
# docs/losses.md mirrors the columns PRESET_COLUMNS (tests/test_losses.py checks it).
PRESET_COLUMNS = ("stabilization", "reference", "advantage", "likelihood", "aggregation")

PRESETS: dict[str, dict] = {
    "sft": dict(stabilization="none", reference="current", advantage="one", likelihood="logp",
                aggregation="token_mean",
                description="NLL, token mean"),
    "dft": dict(stabilization="none", reference="current", advantage="one", likelihood="dft",
                aggregation="token_mean",
                description="Dynamic Fine-Tuning: -sg(p) logp"),
    "chi2_sft": dict(stabilization="none", reference="current", advantage="one", likelihood="chi2",
                     aggregation="token_mean", fdiv_beta=0.1,
                     description="Pearson chi^2 SFT (project's derivation), needs ref_logprobs"),
    "hellinger_sft": dict(stabilization="none", reference="current", advantage="one",
                          likelihood="hellinger", aggregation="token_mean", fdiv_beta=0.1,
                          description="squared-Hellinger SFT (project's derivation), needs ref_logprobs"),
    "reinforce": dict(stabilization="none", reference="current", advantage="given", likelihood="logp",
                      aggregation="token_mean",
                      description="-A logp with the caller's advantages"),
    "rloo": dict(stabilization="none", reference="current", advantage="rloo", likelihood="logp",
                 aggregation="seq_mean_token_sum",
                 description="leave-one-out baseline, completion = one action"),
    "ppo": dict(stabilization="clip", reference="old", advantage="given", likelihood="logp",
                aggregation="token_mean",
                description="PPO clip with given (GAE) advantages"),
    "grpo": dict(stabilization="clip", reference="old", advantage="mean_std", likelihood="logp",
                 aggregation="seq_mean_token_mean",
                 description="TRL/Liger loss_type='grpo'"),
    "bnpo": dict(stabilization="clip", reference="old", advantage="mean_std", likelihood="logp",
                 aggregation="token_mean",
                 description="TRL/Liger loss_type='bnpo' (token mean over the local batch)"),
    "dr_grpo": dict(stabilization="clip", reference="old", advantage="mean", likelihood="logp",
                    aggregation="seq_mean_token_sum_norm",
                    description="TRL/Liger loss_type='dr_grpo' (needs max_completion_length)"),
    "dapo": dict(stabilization="clip", reference="old", advantage="mean_std", likelihood="logp",
                 aggregation="token_mean", eps_high=0.28,
                 description="TRL/Liger loss_type='dapo' (token mean over num_items_in_batch), clip-higher"),
    "gspo": dict(stabilization="seq_clip", reference="old", advantage="mean_std", likelihood="logp",
                 aggregation="seq_mean_token_mean", ratio_level="sequence", eps_low=3e-4, eps_high=4e-4,
                 description="GSPO: clipped sequence ratio exp(mean_t(logp - old))"),
    "cispo": dict(stabilization="cispo", reference="old", advantage="mean_std", likelihood="logp",
                  aggregation="token_mean", eps_high=5.0,
                  description="TRL/Liger loss_type='cispo' (eps_high = eps_max)"),
    "sapo": dict(stabilization="sapo", reference="old", advantage="mean_std", likelihood="logp",
                 aggregation="seq_mean_token_mean", tau_pos=1.0, tau_neg=1.05,
                 description="TRL/Liger loss_type='sapo'"),
    "luspo": dict(stabilization="seq_clip", reference="old", advantage="mean_std", likelihood="logp",
                  aggregation="seq_mean_token_sum", ratio_level="sequence", eps_low=3e-4, eps_high=4e-4,
                  description="LUSPO: GSPO with each sequence's loss times its length (TRL/Liger "
                              "loss_type='luspo'); eps as GSPO's"),
    "vespo": dict(stabilization="vespo", reference="old", advantage="mean_std", likelihood="logp",
                  aggregation="token_mean", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                  vespo_lambda_neg=2.0,
                  description="VESPO: -sg(phi(w_seq)) A logp, gamma weight of the sequence ratio "
                              "(TRL/Liger loss_type='vespo')"),
    "luffy": dict(stabilization="clip", reference="old", advantage="mean_std", likelihood="logp",
                  aggregation="token_mean", demo_part="shaped", shaping_gamma=0.1,
                  description="LUFFY: demo rows -A p/(p+0.1), rollouts PPO clip"),
    "hpt": dict(stabilization="clip", reference="old", advantage="mean_std", likelihood="logp",
                aggregation="seq_mean_token_mean", demo_part="sft", demo_coef=1.0,
                demo_aggregation="token_mean", hpt_gamma=0.0,
                description="HPT, paper: clipped GRPO on rollouts + token-mean NLL on demos"),
    "hpt_release": dict(stabilization="none", reference="old", advantage="mean", likelihood="logp",
                        aggregation="seq_mean_token_sum_norm", max_completion_length=8192,
                        demo_part="sft", demo_coef=1.0, demo_aggregation="token_mean",
                        entropy_coef=0.001, kl_coef=0.0, hpt_gamma=0.0,
                        description="HPT, released code: no std, no clip, Dr.GRPO norm, "
                                    "SFT coef 1.0, entropy 0.001"),
}

PRESET_NAMES = tuple(PRESETS)
