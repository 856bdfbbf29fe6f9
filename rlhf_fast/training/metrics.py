"""Per-step diagnostics: the rollout's (scores, KL to the reference, advantages, lengths) and the
update's (loss metrics averaged over minibatches). Names and meanings: :data:`~.records.METRICS`."""

from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import torch

from .advantages import ADVANTAGE_ESTIMATORS, explained_variance
from .records import Rollout


def pearson(x: Union[torch.Tensor, Sequence[float]], y: Union[torch.Tensor, Sequence[float]]) -> float:
    """Pearson correlation of two equally long series, in fp64 (0 when either is constant)."""
    x, y = (torch.as_tensor(v).double() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)
            for v in (x, y))
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else 0.0


def _std(x: torch.Tensor) -> float:
    return float(x.float().std()) if x.numel() > 1 else 0.0


class UpdateStats:
    """Accumulates per-minibatch loss metrics into the step's summary."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.ratio_min, self.ratio_max, self.approx_kl_max = math.inf, -math.inf, -math.inf

    def add(self, metrics: Dict[str, torch.Tensor], extra: Dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.ratio_min = min(self.ratio_min, values.pop("ratio_min"))
        self.ratio_max = max(self.ratio_max, values.pop("ratio_max"))
        self.approx_kl_max = max(self.approx_kl_max, values["approx_kl"])
        values.update(extra)
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def summary(self) -> Dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        if "kl" in out:
            out["loss_kl"] = out.pop("kl")
        out.pop("entropy", None)  # the step reports the sampling policy's entropy instead
        out.update(ratio_min=self.ratio_min, ratio_max=self.ratio_max, approx_kl_max=self.approx_kl_max)
        return out


def rollout_metrics(rollout: Rollout, cfg) -> Dict[str, float]:
    """The diagnostics of :data:`METRICS` that come from the rollout itself."""
    mask = rollout.samples.response_mask
    mask_f = mask.float()
    n_tokens = mask_f.sum().clamp(min=1.0)
    k1 = (rollout.old_logprobs - rollout.ref_logprobs) * mask_f
    k3 = (torch.exp(-k1) + k1 - 1.0) * mask_f
    per_token = ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator).per_token
    advantages = rollout.advantages[mask] if per_token else rollout.advantages
    raw_advantages = rollout.raw_advantages[mask] if per_token else rollout.raw_advantages
    lengths = rollout.samples.lengths
    spread = advantages.float().std() if advantages.numel() > 1 else advantages.new_zeros(())
    standardised = (advantages.float() - advantages.float().mean()) / spread.clamp(min=1e-8)
    return {
        "score_raw_mean": float(rollout.raw_scores.mean()), "score_raw_std": _std(rollout.raw_scores),
        "score_norm_mean": float(rollout.norm_scores.mean()), "score_norm_std": _std(rollout.norm_scores),
        "score_mean": float(rollout.scores.mean()), "score_std": _std(rollout.scores),
        "reward_mean": float(rollout.rewards.sum(dim=1).mean()),
        "kl_ref_k1_sum": float(k1.sum(dim=1).mean()), "kl_ref_k1_mean": float(k1.sum() / n_tokens),
        "kl_ref_k3_sum": float(k3.sum(dim=1).mean()), "kl_ref_k3_mean": float(k3.sum() / n_tokens),
        "entropy": float((rollout.entropy * mask_f).sum() / n_tokens),
        "adv_mean": float(advantages.mean()), "adv_std": _std(advantages), "adv_max": float(advantages.max()),
        "adv_raw_std": _std(raw_advantages), "adv_raw_max": float(raw_advantages.abs().max()),
        "adv_frac_large": float((standardised > 2.0).float().mean()) if float(spread) > 0 else 0.0,
        "response_length_mean": float(lengths.float().mean()), "response_length_max": float(lengths.max()),
        "frac_truncated": float((~rollout.samples.has_eos).float().mean()),
        "score_length_corr": pearson(rollout.raw_scores, lengths),
        "value_explained_var": (
            explained_variance(rollout.values, rollout.returns, mask) if rollout.values is not None else 0.0
        ),
    }
