"""What a backend receives (:class:`LossConfig`) and returns (:class:`TokenResults`).

Backends receive a :class:`LossConfig`; they never see the user's keyword arguments.
All numeric fields are runtime values for the kernels (no recompilation per value);
only ``has_old``, ``has_ref``, ``kl_estimator`` and the dual-clip switch are feature
switches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
"""Names accepted by ``kl_estimator``; a backend receives the index into this tuple."""

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
BACKENDS = ("auto", "triton", "cpp", "eager")


@dataclass(frozen=True)
class LossConfig:
    """Per-token loss settings as a backend sees them (SPEC §2)."""

    clip_eps_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    clip_eps_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high."""
    dual_clip: float = 0.0
    """c > 1 bounds the surrogate of negative advantages at −c·A; 0 disables it."""
    kl_coef: float = 0.0
    """β, the weight of the KL estimator in the per-token loss."""
    kl_estimator: int = 2
    """Index into :data:`KL_ESTIMATORS` (0 k1, 1 k2, 2 k3, 3 k3+)."""
    entropy_coef: float = 0.0
    """η, the weight of the entropy bonus (subtracted from the loss)."""
    temperature: float = 1.0
    """τ: logits are divided by τ before everything else."""
    has_old: bool = False
    """Whether behaviour-policy log-probs are given (otherwise the ratio is 1)."""
    has_ref: bool = False
    """Whether reference log-probs are given (otherwise KL is 0)."""

    @property
    def has_dual_clip(self) -> bool:
        return self.dual_clip > 0.0

    @property
    def has_kl(self) -> bool:
        """Whether the KL term is computed (for the metric even when β = 0)."""
        return self.has_ref


def make_config(
    *,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    has_old: bool = False,
    has_ref: bool = False,
) -> LossConfig:
    """Check the scalar options (SPEC §6) and build a :class:`LossConfig`.

    Raises ``ValueError`` naming the offending argument.
    """
    _check_finite_positive("clip_eps", clip_eps)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    _check_finite_positive("clip_eps_high", clip_eps_high)
    if dual_clip is not None:
        if not _is_real(dual_clip) or not math.isfinite(dual_clip) or dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be a finite number > 1 (or None), got {dual_clip!r}")
    _check_finite_positive("temperature", temperature)
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if not _is_real(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef != 0.0 and not has_ref:
        raise ValueError("kl_coef != 0 needs ref_logprobs (the frozen reference's log-probs)")
    return LossConfig(
        clip_eps_low=float(clip_eps),
        clip_eps_high=float(clip_eps_high),
        dual_clip=float(dual_clip) if dual_clip is not None else 0.0,
        kl_coef=float(kl_coef),
        kl_estimator=KL_ESTIMATORS.index(kl_estimator),
        entropy_coef=float(entropy_coef),
        temperature=float(temperature),
        has_old=has_old,
        has_ref=has_ref,
    )


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite_positive(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class TokenResults(NamedTuple):
    """Per-token results of a fused forward, all fp32 ``[N]`` (N = number of rows).

    Rows that the caller masks out are computed like any other (their targets are
    sanitised to 0 before the call); the caller zeroes or ignores them.
    """

    logprobs: torch.Tensor  # lp = x_y − lse
    entropy: torch.Tensor  # H = lse − Σ p·x
    lse: torch.Tensor  # log Σ exp(x), x = logits / τ
    ratio: torch.Tensor  # r = exp(lp − old), 1 without old log-probs
    pg: torch.Tensor  # clipped (and dual-clipped) surrogate
    kl: torch.Tensor  # the chosen KL estimator, 0 without reference log-probs
    loss: torch.Tensor  # ℓ = pg + β·kl − η·H
    dlogp: torch.Tensor  # g = dℓ/d lp (surrogate and KL parts; the entropy part is separate)
