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
    ``e = clip(kl / target − 1, −0.2, 0.2)`` and ``β ← β·(1 + e·n / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, clip: float = 0.2):
        if target <= 0:
            raise ValueError(f"kl_target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"kl_horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.clip = float(clip)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -self.clip), self.clip)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "clip": self.clip}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
        self.clip = float(state["clip"])
