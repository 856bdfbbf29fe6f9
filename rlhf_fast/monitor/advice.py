"""The one change an alarm recommends, with its numbers, in the words of the trainer that runs.

The change is always the same lever, because the incident's causal chain has one link that
nothing else repairs: PPO's clip bounds each step against the previous policy, never the distance
from the reference, so only a KL budget to the reference, held by an adaptive controller (Ziegler
et al. 2019), keeps the policy where the proxy can be trusted. Its numbers follow from the run:

* **the budget**: half the KL per reply reached when the alarm fires. The alarm needs the drift to
  have gone into an exploit for several records, so the run is past the point where gold would
  have peaked; with Gao et al.'s (2022) form gold ∝ d·(α − β·d), d = √KL, gold is back at its
  start where KL is 4× its peak's. Half the KL reached lies between the two: short of the damage,
  with room for the gains made before it. With a declared budget that the controller lost, the
  budget stays and the controller's start changes.
* **the starting β**: σ/√(2·budget), the β at which the KL-regularised optimum of a score with
  spread σ sits exactly at the budget (KL = σ²/2β²; σ = 1 on a normalised reward), so the
  controller starts where it should end instead of spending its first steps finding the scale.
"""

from __future__ import annotations

import math
from typing import Optional

from .detectors import bound
from .state import History


def _nice(x: float) -> float:
    """Two significant digits."""
    if not math.isfinite(x) or x <= 0:
        return x
    digits = 1 - int(math.floor(math.log10(x)))
    return round(x, digits)


def _kl_reached(h: History) -> Optional[float]:
    values = [v for _, v in h.series("kl")]
    return max(values) if values else None


def recommend(h: History, trainer: str, signal: str) -> str:
    """"Change: ..." for an alarm on ``signal`` in a run of ``trainer`` ("rlhf_fast", "trl", "verl")."""
    b = bound(h)
    reached = _kl_reached(h)
    length = h.last("length")
    if signal == "kl_budget" and b.declared:
        budget = b.budget
        if b.kind == "controller":
            why = (f"the budget the controller lost: it starts too weak to hold {budget:.3g} nats/reply, and it can "
                   "move β only by a factor 1 + 0.2·n/H per step")
        else:
            why = "the budget declared for this run, which nothing holds it to now"
    elif reached is not None and reached > 0:
        budget = _nice(reached / 2.0)
        if b.declared:
            budget = min(budget, b.budget)
        why = f"half the {reached:.2f} nats/reply this run has reached"
    else:
        budget = _nice(b.budget)
        why = "the KL is not logged, so the budget is the declared one" if b.declared else \
            "the KL is not logged, so the budget is the default, ln 100"
    if h.kl_penalty == "loss":
        per_token = budget / length if length else None
        sigma, beta = 1.0, (_nice(1.0 / math.sqrt(2.0 * per_token)) if per_token else None)
    else:
        per_token = budget / length if length else None
        sigma = h.reference_mean("score_std")
        if sigma is None and h.reference_mean("score_range") is not None:
            sigma = h.reference_mean("score_range") / 2.0
        beta = _nice(sigma / math.sqrt(2.0 * budget)) if sigma else None
    head = (f"Change: hold the KL to the reference at {budget:g} nats/reply ({why}) with an adaptive KL controller "
            "(Ziegler et al. 2019)")
    if trainer == "trl":
        if beta is None or per_token is None:
            return head + ": set GRPOConfig(beta=...) > 0 so that the KL is penalised and measured."
        return (f"{head}; TRL's GRPO has a fixed β in the loss only, so set GRPOConfig(beta={beta:g}), the β whose "
                f"per-token ceiling 1/(2β²) is {per_token:.2g} nats/token = {budget:g} nats/reply at "
                f"{length:.1f} tokens.")
    if trainer == "verl":
        target = f"{per_token:.3g}" if per_token else "..."
        coef = f" algorithm.kl_ctrl.kl_coef={beta:g}" if beta else ""
        return (f"{head}: algorithm.use_kl_in_reward=True algorithm.kl_ctrl.type=adaptive "
                f"algorithm.kl_ctrl.target_kl={target}{coef} (verl's target is per token: {budget:g} nats/reply "
                f"over {length or 0:.1f} tokens).")
    if beta is None:
        return head + f": PPOConfig(adaptive_kl=True, kl_target={budget:g})."
    normalised = "" if h.kl_penalty == "loss" else (
        f"; on a normalised reward (reward_normalize=True, σ = 1) kl_coef={_nice(1 / math.sqrt(2 * budget)):g}")
    return (f"{head}: PPOConfig(adaptive_kl=True, kl_target={budget:g}, kl_coef={beta:g}), the starting β from "
            f"σ/√(2·budget) with σ = {sigma:.2f}{normalised}.")
