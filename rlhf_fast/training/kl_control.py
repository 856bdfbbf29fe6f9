"""KL coefficient controllers: fixed β, or adaptive toward a KL target (Ziegler et al. 2019).

The KL the controllers see is the **per-sequence sum** of the k1 estimator
(Σ_t log π(y_t) − log π_ref(y_t) over a reply), averaged over the step's samples:
the KL between the two sequence distributions, which is what the target means in
Ziegler et al. (2019) and what Gao et al. (2022) plot gold score against.
"""

from __future__ import annotations

from typing import Dict


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019), arXiv:1909.08593, §2.2.

    After each step with ``n`` samples and mean per-sequence KL ``kl``:
    ``e = clip(kl / target − 1, −0.2, 0.2)`` and ``β ← max(β·(1 + e·n / horizon), floor)``.

    ``floor`` (default 0: Ziegler et al.'s controller) bounds β from below. With
    ``floor = init_kl_coef`` the target is a ceiling rather than a set point: β rises to keep
    the KL under it and never falls below its start to make the policy spend a budget that
    nothing at that β was worth spending.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, clip: float = 0.2, floor: float = 0.0):
        if target <= 0:
            raise ValueError(f"kl_target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"kl_horizon must be > 0, got {horizon}")
        if not 0 <= floor <= init_kl_coef:
            raise ValueError(f"kl_coef_min must be in [0, kl_coef] = [0, {init_kl_coef}], got {floor}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.clip = float(clip)
        self.floor = float(floor)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -self.clip), self.clip)
        self.value = max(self.value * (1.0 + error * n_samples / self.horizon), self.floor)
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "clip": self.clip,
                "floor": self.floor}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
        self.clip = float(state["clip"])
        self.floor = float(state.get("floor", 0.0))  # checkpoints written before the floor existed
