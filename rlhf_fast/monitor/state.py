"""The monitor's small state: its settings, the reference's values and a sliding window of signals."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

REFERENCE_RECORDS = 3
"""Records averaged for the reference's correlations and spreads (:meth:`History.reference_mean`):
three batches steady a correlation while the policy has moved little. Levels (length, entropy,
score) are the first record's alone: its rollout is sampled before any update."""


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitor is told about the run (everything optional)."""

    kl_budget: Optional[float] = None
    """KL to the reference the run may spend, nats per reply (None: a controller's target when the
    records carry one, else the default of :data:`~.detectors.DEFAULT_KL_BUDGET`)."""
    kl_penalty: Optional[str] = None
    """Where β acts: "reward" (−β·KL per token in the reward) or "loss" (β·KL in the loss); None: the
    trainer's default (rlhf_fast: reward, TRL: loss, verl: from its metric names)."""
    beta: Optional[float] = None
    """The KL coefficient when the records do not carry it (TRL logs none)."""
    clip_eps: float = 0.2
    """PPO's clip range ε (for the approx_kl threshold)."""
    held_out: Tuple[str, ...] = ()
    """Record keys of held-out scores the user logs (a judge, a classifier): watched against the proxy."""
    window: int = 10
    persistence: int = 3

    def problems(self) -> List[str]:
        problems = []
        if self.kl_budget is not None and not self.kl_budget > 0:
            problems.append(f"kl_budget must be > 0 nats per reply, got {self.kl_budget}")
        if self.kl_penalty not in (None, "reward", "loss"):
            problems.append(f"kl_penalty must be 'reward', 'loss' or None, got {self.kl_penalty!r}")
        if self.beta is not None and not self.beta >= 0:
            problems.append(f"beta must be >= 0, got {self.beta}")
        if not self.clip_eps > 0:
            problems.append(f"clip_eps must be > 0, got {self.clip_eps}")
        if self.window < 4:
            problems.append(f"window must be >= 4 records (a slope with a standard error), got {self.window}")
        if self.persistence < 1:
            problems.append(f"persistence must be >= 1 record, got {self.persistence}")
        return problems


class History:
    """The reference's values (mean of the first records), the first window and the last window."""

    def __init__(self, config: MonitorConfig, kl_penalty: Optional[str]):
        self.config = config
        self.kl_penalty = kl_penalty
        self.records = 0
        self.start_step: float = 1.0
        self._window: Deque[Tuple[float, Dict[str, float]]] = deque(maxlen=config.window)
        self._first: List[Tuple[float, Dict[str, float]]] = []

    def add(self, step: float, signals: Dict[str, float]) -> None:
        if self.records == 0:
            self.start_step = step
        self.records += 1
        self._window.append((step, signals))
        if len(self._first) < self.config.window:
            self._first.append((step, signals))

    @property
    def step(self) -> float:
        return self._window[-1][0] if self._window else 0.0

    def last(self, name: str) -> Optional[float]:
        """The latest record's value (None when it does not carry the signal)."""
        return self._window[-1][1].get(name) if self._window else None

    def series(self, name: str) -> List[Tuple[float, float]]:
        """``(step, value)`` over the window, where present."""
        return [(s, v[name]) for s, v in self._window if name in v]

    def early(self, name: str) -> List[Tuple[float, float]]:
        """``(step, value)`` over the first window of the run, with the reference's 0 KL at step 0
        for the KL (the policy starts as the reference)."""
        points = [(s, v[name]) for s, v in self._first if name in v]
        return ([(self.start_step - 1, 0.0)] if name == "kl" else []) + points

    def paired(self, a: str, b: str) -> List[Tuple[float, float]]:
        return [(v[a], v[b]) for _, v in self._window if a in v and b in v]

    def reference(self, name: str) -> Optional[float]:
        """The first record's value: the reference's own replies (sampled before any update)."""
        values = [v[name] for _, v in self._first if name in v]
        return values[0] if values else None

    def reference_mean(self, name: str) -> Optional[float]:
        """Mean over the first :data:`REFERENCE_RECORDS` records carrying the signal."""
        values = [v[name] for _, v in self._first if name in v][:REFERENCE_RECORDS]
        return sum(values) / len(values) if values else None
