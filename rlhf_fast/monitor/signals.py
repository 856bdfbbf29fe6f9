"""The monitor's signals, and the adapters that read them from each trainer's metric names.

The monitor never sees a trainer's record as such: an adapter maps it to the canonical signals
of :data:`SIGNALS` (plain floats), and the detectors read only those. A key no adapter names is
ignored, which is how evaluation-only numbers stay out: the case study logs the gold score, the
refusal rate and the salesy share of each step's replies, and no adapter maps them. A held-out
score the user *wants* watched (a judge, a safety classifier) is named explicitly
(``RewardHackingMonitor(held_out=...)``) and arrives as ``held_out/<name>``.

Adapters:

* :data:`OURS` — rlhf_fast's PPO loop (``metrics.jsonl``, :data:`rlhf_fast.training.METRICS`);
* :data:`TRL` — TRL's ``GRPOTrainer`` logs (``trainer_state.json``'s ``log_history``), plus the
  within-batch advantage–length correlation that ``rlhf_fast.integrations.trl`` adds;
* :data:`VERL` — verl 0.9.1's per-step metrics dict (``actor/pg_clipfrac``, ``critic/score/mean``,
  ...), as its trackers receive it (``rlhf_fast.integrations.verl_monitor`` adds the adaptive
  controller's target per reply as ``rlhf_fast/kl_target``; verl's own is per token).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Mapping, NamedTuple, Optional

SIGNALS: Dict[str, str] = {
    "kl": "KL to the reference per reply (nats, summed over a reply's tokens, mean over replies)",
    "kl_token": "KL to the reference per token (nats)",
    "kl_target": "the KL budget an adaptive controller holds, per reply (nats)",
    "beta": "coefficient of the KL penalty this step",
    "score": "proxy score (reward model or reward function), mean over replies",
    "score_std": "proxy score, standard deviation over the step's replies",
    "score_range": "proxy score, max − min over the step's replies (when no std is logged)",
    "length": "reply length in tokens, mean",
    "score_length_corr": "within-batch correlation of the score (or advantage) with reply length",
    "ratio_above": "share of tokens with new/old ratio > 1 + ε before clipping",
    "ratio_below": "share of tokens with new/old ratio < 1 − ε before clipping",
    "clipfrac": "share of tokens whose surrogate is clipped",
    "approx_kl": "KL between the policy before and after the step's updates, per token",
    "adv_max": "largest advantage of the step in units of the advantages' standard deviation",
    "adv_frac_large": "share of advantages more than 2 standard deviations above their mean",
    "entropy": "entropy of the sampling policy per token (nats)",
}
"""The canonical signals the detectors read (plus ``held_out/<name>`` for declared held-out scores)."""

HELD_OUT_PREFIX = "held_out/"


class Adapter(NamedTuple):
    """How one trainer names the signals: ``names[signal]`` is the trainer's key (first present wins)."""

    name: str
    names: Dict[str, tuple]
    kl_penalty: Optional[str]
    """Where the trainer's KL coefficient acts by default: "reward" (−β·KL in the reward) or "loss"."""
    derive: Optional[Callable[[Mapping[str, float], Dict[str, float]], None]] = None
    """Fills signals computed from others (e.g. the KL per reply from the KL per token and the length)."""


def _finite(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _per_reply_kl(record: Mapping[str, float], out: Dict[str, float]) -> None:
    if "kl" not in out and "kl_token" in out and "length" in out:
        out["kl"] = out["kl_token"] * out["length"]


def _ours_derive(record: Mapping[str, float], out: Dict[str, float]) -> None:
    adv_std = _finite(record.get("adv_std"))
    adv_max, adv_mean = _finite(record.get("adv_max")), _finite(record.get("adv_mean"))
    if adv_std and adv_max is not None and adv_mean is not None:
        out["adv_max"] = (adv_max - adv_mean) / adv_std


def _verl_derive(record: Mapping[str, float], out: Dict[str, float]) -> None:
    high, low = _finite(record.get("critic/score/max")), _finite(record.get("critic/score/min"))
    if high is not None and low is not None:
        out["score_range"] = high - low
    _per_reply_kl(record, out)


OURS = Adapter(
    "rlhf_fast",
    {
        "kl": ("kl_ref_k1_sum",), "kl_token": ("kl_ref_k1_mean",), "kl_target": ("kl_target",),
        "beta": ("kl_coef",), "score": ("score_mean",), "score_std": ("score_std",),
        "length": ("response_length_mean",), "score_length_corr": ("score_length_corr",),
        "ratio_above": ("ratio_above",), "ratio_below": ("ratio_below",), "clipfrac": ("clipfrac",),
        "approx_kl": ("approx_kl",), "adv_frac_large": ("adv_frac_large",), "entropy": ("entropy",),
    },
    kl_penalty="reward",
    derive=_ours_derive,
)

TRL = Adapter(
    "trl",
    {
        "kl_token": ("kl",), "score": ("reward",), "score_std": ("reward_std",),
        "length": ("completions/mean_length",), "score_length_corr": ("rlhf_fast/advantage_length_corr",),
        "clipfrac": ("clip_ratio/region_mean", "cispo_clip_ratio"), "entropy": ("entropy",),
    },
    kl_penalty="loss",
    derive=_per_reply_kl,
)

VERL = Adapter(
    "verl",
    {
        "kl_token": ("actor/reward_kl_penalty", "actor/kl_loss"),
        "beta": ("actor/reward_kl_penalty_coeff", "actor/kl_coef"), "kl_target": ("rlhf_fast/kl_target",),
        "score": ("critic/score/mean",), "length": ("response_length/mean",),
        "clipfrac": ("actor/pg_clipfrac",), "approx_kl": ("actor/ppo_kl",),
        "adv_max": ("critic/advantages/max",), "entropy": ("actor/entropy",),
    },
    kl_penalty=None,  # read from the record: actor/reward_kl_penalty (reward) or actor/kl_loss (loss)
    derive=_verl_derive,
)

ADAPTERS: Dict[str, Adapter] = {a.name: a for a in (OURS, TRL, VERL)}

_MARKERS = {
    # a key only that trainer logs → the trainer
    "rlhf_fast": ("kl_ref_k1_sum", "response_length_mean", "ratio_above"),
    "trl": ("completions/mean_length", "clip_ratio/region_mean", "frac_reward_zero_std"),
    "verl": ("critic/score/mean", "actor/pg_clipfrac", "response_length/mean"),
}


def detect(keys: Iterable[str]) -> Optional[str]:
    """Which trainer logged a record with these keys ("rlhf_fast", "trl", "verl"), or None."""
    keys = set(keys)
    for name, markers in _MARKERS.items():
        if keys.intersection(markers):
            return name
    return None


def kl_penalty_of(adapter: Adapter, record: Mapping[str, float]) -> Optional[str]:
    """Where this record's KL coefficient acts ("reward" or "loss"), as far as its keys say."""
    if adapter.name == "verl":
        if "actor/reward_kl_penalty" in record:
            return "reward"
        if "actor/kl_loss" in record:
            return "loss"
        return None
    return adapter.kl_penalty


def canonical(record: Mapping[str, float], adapter: Adapter, held_out: Iterable[str] = ()) -> Dict[str, float]:
    """The canonical signals of one record: finite floats only, every other key ignored.

    ``held_out``: keys of the record the user declared as held-out scores; each becomes
    ``held_out/<key>``. Nothing else outside ``adapter.names`` is read.
    """
    out: Dict[str, float] = {}
    for signal, keys in adapter.names.items():
        for key in keys:
            value = _finite(record.get(key))
            if value is not None:
                out[signal] = value
                break
    if adapter.derive is not None:
        adapter.derive(record, out)
    for key in held_out:
        value = _finite(record.get(key))
        if value is not None:
            out[HELD_OUT_PREFIX + key] = value
    return out
