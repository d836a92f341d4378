"""``PreferenceConfig``: one pairwise preference loss (DPO family, SimPO, ORPO) as a row of data.

Every loss is built from the same pieces (docs/losses.md, "Preference, reward and value losses"):

    s_y   = log pi(y|x) [- log pi_ref(y|x)]            summed over the completion, or its mean when
                                                       ``length_normalize`` (ref sums are divided by
                                                       the same token count)
    z     = beta * (s_chosen - s_rejected) - gamma     the preference logit
    l     = loss_type(z)                               one formula per ``loss_type``
    L     = mean_pairs(l) + nll_coef * NLL(chosen)     NLL: token mean over every chosen target token

Every preset is one row of :data:`PREFERENCE_PRESETS`; ``docs/losses.md`` mirrors that table (a test
checks they agree).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "orpo")


@dataclass(frozen=True)
class PreferenceConfig:
    """A pairwise preference loss.

    - ``loss_type``: ``"sigmoid"`` (DPO; with ``label_smoothing`` eps the conservative cDPO
      ``-(1-eps) log s(z) - eps log s(-z)``), ``"robust"`` (Chowdhury et al.'s unbiased loss under label
      noise eps), ``"hinge"`` (SLiC: ``relu(1 - z)``), ``"ipo"`` (``(s_c - s_r - 1/(2 beta))^2``),
      ``"orpo"`` (``-beta log s(log odds(p_c) - log odds(p_r))``, ``p = exp(s)``, no reference).
    - ``beta``: the inverse temperature (DPO's beta, IPO's tau, ORPO's lambda, SimPO's beta).
    - ``label_smoothing``: the assumed probability eps that a label is flipped (sigmoid, robust).
    - ``gamma``: a target margin subtracted from the logit (SimPO's gamma); sigmoid, robust, hinge.
    - ``length_normalize``: use per-token means of the log-probs instead of sums (SimPO, ORPO, IPO as TRL).
    - ``use_reference``: scores are log-ratios to the reference model; else raw log-probs (SimPO, ORPO, CPO).
    - ``nll_coef``: weight of the chosen-token NLL added to the loss (TRL's ``rpo_alpha``; ORPO's 1).
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    length_normalize: bool = False
    use_reference: bool = True
    nll_coef: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"PreferenceConfig.loss_type must be one of {list(LOSS_TYPES)}, "
                             f"got {self.loss_type!r}")
        for name in ("beta", "label_smoothing", "gamma", "nll_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"PreferenceConfig.{name} must be a finite number, got {v!r}")
        for name in ("length_normalize", "use_reference"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PreferenceConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not self.beta > 0:
            raise ValueError(f"PreferenceConfig.beta must be > 0, got {self.beta!r}")
        if self.nll_coef < 0:
            raise ValueError(f"PreferenceConfig.nll_coef must be >= 0, got {self.nll_coef!r}")
        eps = self.label_smoothing
        if self.loss_type == "sigmoid" and not 0 <= eps <= 0.5:
            raise ValueError(f"PreferenceConfig.label_smoothing must be in [0, 0.5] for loss_type='sigmoid' "
                             f"(cDPO), got {eps!r}")
        if self.loss_type == "robust" and not 0 <= eps < 0.5:
            raise ValueError(f"PreferenceConfig.label_smoothing must be in [0, 0.5) for loss_type='robust' "
                             f"(it divides by 1 - 2 eps), got {eps!r}")
        if self.loss_type in ("hinge", "ipo", "orpo") and eps != 0:
            raise ValueError(f"PreferenceConfig.label_smoothing is not defined for loss_type="
                             f"{self.loss_type!r}; it must be 0, got {eps!r}")
        if self.loss_type in ("ipo", "orpo") and self.gamma != 0:
            raise ValueError(f"PreferenceConfig.gamma (a logit margin) is not defined for loss_type="
                             f"{self.loss_type!r}; it must be 0, got {self.gamma!r}")
        if self.loss_type == "orpo" and self.use_reference:
            raise ValueError("PreferenceConfig.loss_type='orpo' is reference-free (odds of the policy's own "
                             "probabilities); set use_reference=False")

    @classmethod
    def preset(cls, name: str, **overrides) -> "PreferenceConfig":
        """The config of preset ``name`` (a row of :data:`PREFERENCE_PRESETS`), with ``overrides``."""
        if not isinstance(name, str) or name not in PREFERENCE_PRESETS:
            raise ValueError(f"unknown preference preset {name!r}; valid presets: {sorted(PREFERENCE_PRESETS)}")
        _check_fields(overrides)
        kw = {k: v for k, v in PREFERENCE_PRESETS[name].items() if k != "description"}
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **changes) -> "PreferenceConfig":
        """A copy with ``changes`` (validated like the constructor)."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(PreferenceConfig))


def _check_fields(kw):
    bad = sorted(k for k in kw if k not in field_names())
    if bad:
        raise ValueError(f"unknown PreferenceConfig field(s) {bad}; valid fields: {sorted(field_names())}")


# ---------------------------------------------------------------------------------------------
# The preset table: one row per preset. docs/losses.md mirrors the columns PREFERENCE_COLUMNS.
PREFERENCE_COLUMNS = ("loss_type", "beta", "label_smoothing", "gamma", "length_normalize",
                      "use_reference", "nll_coef")

PREFERENCE_PRESETS: dict[str, dict] = {
    "dpo": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.0, length_normalize=False,
                use_reference=True, nll_coef=0.0,
                description="DPO (Rafailov et al. 2023), TRL loss_type='sigmoid'"),
    "cdpo": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1, gamma=0.0, length_normalize=False,
                 use_reference=True, nll_coef=0.0,
                 description="conservative DPO (Mitchell 2023): labels flipped with prob. eps"),
    "rpo": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.0, length_normalize=False,
                use_reference=True, nll_coef=1.0,
                description="DPO + chosen NLL (Pang et al. 2024; TRL rpo_alpha / loss_type=['sigmoid','sft'])"),
    "ipo": dict(loss_type="ipo", beta=0.1, label_smoothing=0.0, gamma=0.0, length_normalize=True,
                use_reference=True, nll_coef=0.0,
                description="IPO (Azar et al. 2023) Eq. 17, per-token log-ratios as TRL"),
    "hinge": dict(loss_type="hinge", beta=0.1, label_smoothing=0.0, gamma=0.0, length_normalize=False,
                  use_reference=True, nll_coef=0.0,
                  description="SLiC-HF hinge (Zhao et al. 2023), TRL loss_type='hinge'"),
    "robust": dict(loss_type="robust", beta=0.1, label_smoothing=0.1, gamma=0.0, length_normalize=False,
                   use_reference=True, nll_coef=0.0,
                   description="robust DPO (Chowdhury et al. 2024), unbiased under flip rate eps"),
    "simpo": dict(loss_type="sigmoid", beta=2.0, label_smoothing=0.0, gamma=1.0, length_normalize=True,
                  use_reference=False, nll_coef=0.0,
                  description="SimPO (Meng et al. 2024): mean log-probs, no reference, margin gamma"),
    "orpo": dict(loss_type="orpo", beta=0.1, label_smoothing=0.0, gamma=0.0, length_normalize=True,
                 use_reference=False, nll_coef=1.0,
                 description="ORPO (Hong et al. 2024): NLL + lambda * odds-ratio loss, lambda = beta"),
}

PREFERENCE_PRESET_NAMES = tuple(PREFERENCE_PRESETS)
