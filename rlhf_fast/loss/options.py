"""The loss options: one frozen, validated object for every entry point.

:class:`LossOptions` holds the keyword options that define the loss's value (the math of
the contract, ``docs/contract.md``). ``rf.ppo_loss``, ``rf.fused_linear_ppo_loss``,
``rf.PPOLoss``, the trainer's ``PPOConfig`` and the case study all take it (or its fields
as keywords), so each option is written once: here. Construction validates every field
(``ValueError`` naming the option); :meth:`LossOptions.row_params` turns it into what a row
backend sees.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional

from ..backends.rows import RowParams
from .policy import POLICY_LOSSES

KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
"""Names accepted by ``kl_estimator``; a backend receives the index into this tuple."""

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
"""Names accepted by ``loss_agg`` (the aggregation section of the contract)."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any):
    """A dataclass field with one line of help text (read by the command line and the docs)."""
    return field(default=default, metadata={"help": help}, **kwargs)



ROLLOUT_IS_MODES = ("none", "truncate", "mask")
ROLLOUT_IS_LEVELS = ("token", "sequence")
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38  # the smallest normal fp32 number


@dataclass(frozen=True)
class LossOptions:
    """Keyword options of the PPO loss; validated at construction."""

    clip_eps: float = option(0.2, "ε_low: the ratio is clipped below at 1 − ε_low (and above at 1 + ε_high).")
    clip_eps_high: Optional[float] = option(None, 'ε_high for asymmetric "clip-higher" (None = clip_eps).')
    dual_clip: Optional[float] = option(
        None, "c > 1: the surrogate of a negative advantage is bounded at −c·A (None = off).")
    kl_coef: float = option(0.0, "β: weight of the KL estimator to the reference in the per-token loss.")
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = option(
        "k3", "KL estimator to the reference (k3+: value of k3, gradient of k2).")
    entropy_coef: float = option(0.0, "η: weight of the entropy bonus (subtracted from the loss).")
    temperature: float = option(1.0, "τ: logits are divided by τ before everything else.")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        option("token-mean", "How per-token losses are aggregated into the loss."))
    policy_loss: str = option("ppo", 'Policy-loss variant: "ppo", "gspo", "cispo" or "sapo" (POLICY_LOSSES).')
    sapo_tau_pos: float = option(1.0, "SAPO gate temperature κ for positive advantages.")
    sapo_tau_neg: float = option(1.05, "SAPO gate temperature κ for negative advantages.")
    rollout_is: Literal["none", "truncate", "mask"] = option(
        "none", "Importance correction for the inference engine's sampling (needs rollout_logprobs per call).")
    rollout_is_level: Literal["token", "sequence"] = option(
        "token", "Rollout importance weight per token, or one per sequence.")
    rollout_is_min: Optional[float] = option(None, "Lower bound of the rollout importance weight (None = none).")
    rollout_is_max: Optional[float] = option(2.0, "Upper bound of the rollout importance weight (None = none).")
    kl_ratio_weighted: bool = option(
        False, "Weight each token's KL by its ratio r (the unbiased KL of TRL's use_bias_correction_kl).")
    log_ratio_clamp: Optional[float] = option(
        None, "Clamp each token's log-ratio to [−c, c] before exp (verl / OpenRLHF use 20); None = off.")
    kl_clamp: Optional[float] = option(
        None, "Clamp the KL value to [−c, c] (verl clamps k3 at 10); None = off.")
    norm_length: Optional[float] = option(
        None, "seq-mean-token-sum-norm divides by B·norm_length (default T; required for packed input).")

    def __post_init__(self) -> None:
        problems = self.problems()
        if len(problems) == 1:
            raise ValueError(problems[0])
        if problems:
            raise ValueError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))

    def problems(self) -> List[str]:
        """Every problem with the options, one message each naming the option (empty when valid)."""
        problems: List[str] = []
        positive = ["clip_eps", "temperature"] + (["clip_eps_high"] if self.clip_eps_high is not None else [])
        for name in positive:
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if self.dual_clip is not None:
            if not _is_real(self.dual_clip) or not math.isfinite(self.dual_clip) or self.dual_clip <= 1.0:
                problems.append(f"dual_clip must be a finite number > 1 (or None), got {self.dual_clip!r}")
        for name in ("kl_coef", "entropy_coef"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            problems.append(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.policy_loss not in POLICY_LOSSES:
            problems.append(f"policy_loss must be one of {POLICY_LOSSES.names()}, got {self.policy_loss!r}")
        elif self.dual_clip is not None and not POLICY_LOSSES.get(self.policy_loss).takes_dual_clip:
            takers = [repr(name) for name in POLICY_LOSSES if POLICY_LOSSES.get(name).takes_dual_clip]
            takers = " and ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 1 else takers)
            problems.append(f"dual_clip applies to policy_loss {takers} only, not {self.policy_loss!r}")
        for name in ("clip_eps", "clip_eps_high"):  # 1 + ε must stay a finite fp32 number
            value = getattr(self, name)
            if _is_real(value) and math.isfinite(value) and value >= FP32_MAX / 2:
                problems.append(f"{name} must be < {FP32_MAX / 2:.3g} (1 + ε must be a finite fp32 number), "
                                f"got {value!r}")
        if _is_real(self.temperature) and 0 < self.temperature < FP32_TINY:
            problems.append(f"temperature must be ≥ {FP32_TINY:.3g} (a normal fp32 number), got {self.temperature!r}")
        for name in ("sapo_tau_pos", "sapo_tau_neg", "log_ratio_clamp", "kl_clamp", "norm_length"):
            value = getattr(self, name)
            if value is None and name in ("log_ratio_clamp", "kl_clamp", "norm_length"):
                continue
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if self.rollout_is not in ROLLOUT_IS_MODES:
            problems.append(f"rollout_is must be one of {ROLLOUT_IS_MODES}, got {self.rollout_is!r}")
        if self.rollout_is_level not in ROLLOUT_IS_LEVELS:
            problems.append(f"rollout_is_level must be one of {ROLLOUT_IS_LEVELS}, got {self.rollout_is_level!r}")
        if self.rollout_is in ("truncate", "mask"):
            low, high = self.rollout_is_min, self.rollout_is_max
            for name, value in (("rollout_is_min", low), ("rollout_is_max", high)):
                if value is not None and (not _is_real(value) or not math.isfinite(value) or value < 0):
                    problems.append(f"{name} must be a finite number ≥ 0 or None, got {value!r}")
            if low is None and high is None:
                problems.append(f"rollout_is={self.rollout_is!r} needs rollout_is_min or rollout_is_max (both None)")
            elif low is not None and high is not None and _is_real(low) and _is_real(high) and low > high:
                problems.append(f"rollout_is_min ({low}) must be ≤ rollout_is_max ({high})")
        if not isinstance(self.kl_ratio_weighted, bool):
            problems.append(f"kl_ratio_weighted must be a bool, got {self.kl_ratio_weighted!r}")
        return problems

    @property
    def is_plain_ppo(self) -> bool:
        """Options the one-pass fused kernels compute entirely (no variant, correction or clamp)."""
        return (POLICY_LOSSES.get(self.policy_loss).row_kernels and self.rollout_is == "none"
                and not self.kl_ratio_weighted and self.log_ratio_clamp is None and self.kl_clamp is None)

    @property
    def needs_sequences(self) -> bool:
        """Whether the per-token math needs to know which tokens form a sequence."""
        return POLICY_LOSSES.get(self.policy_loss).needs_sequences or (
            self.rollout_is != "none" and self.rollout_is_level == "sequence")

    @property
    def clip_high(self) -> float:
        """ε_high as used: ``clip_eps_high`` or, when None, ``clip_eps``."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def check_reference(self, has_ref: bool) -> None:
        """``kl_coef != 0`` needs the reference's log-probs."""
        if self.kl_coef != 0.0 and not has_ref:
            raise ValueError("kl_coef != 0 needs ref_logprobs (the frozen reference's log-probs)")

    def row_params(self, has_old: bool, has_ref: bool) -> RowParams:
        """What a row backend sees for one call."""
        self.check_reference(has_ref)
        return RowParams(
            clip_eps_low=float(self.clip_eps),
            clip_eps_high=float(self.clip_high),
            dual_clip=float(self.dual_clip) if self.dual_clip is not None else 0.0,
            kl_coef=float(self.kl_coef),
            kl_estimator=KL_ESTIMATORS.index(self.kl_estimator),
            entropy_coef=float(self.entropy_coef),
            temperature=float(self.temperature),
            has_old=has_old,
            has_ref=has_ref,
        )

    @classmethod
    def from_kwargs(cls, options: Optional[LossOptions], kwargs: Mapping[str, Any], where: str) -> LossOptions:
        """``options`` (or the defaults) with the keyword options in ``kwargs`` replacing its fields.

        An unknown keyword raises ``TypeError`` (as Python does for any function) listing the valid ones.
        """
        unknown = sorted(set(kwargs) - OPTION_NAMES)
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; the loss options are "
                            f"{list(OPTION_NAMES_ORDERED)}")
        if options is None:
            return cls(**kwargs)
        if not isinstance(options, LossOptions):
            raise ValueError(f"options must be a rlhf_fast.LossOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **kwargs) if kwargs else options

    def as_dict(self) -> Dict[str, Any]:
        """The loss options only (also for a subclass such as the trainer's PPOConfig)."""
        return {name: getattr(self, name) for name in OPTION_NAMES_ORDERED}

    def loss_options(self, **changes) -> LossOptions:
        """A plain :class:`LossOptions` with these options (and ``changes``), e.g. from a PPOConfig."""
        return LossOptions(**{**self.as_dict(), **changes})


OPTION_NAMES_ORDERED = tuple(f.name for f in dataclasses.fields(LossOptions))
OPTION_NAMES = frozenset(OPTION_NAMES_ORDERED)
"""The keyword options every loss entry point accepts."""


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
