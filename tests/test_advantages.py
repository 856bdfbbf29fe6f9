"""Hand-computed advantage estimators and KL-controller updates (numbers worked out in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast.training.advantages import (
    explained_variance,
    gae_advantages,
    grpo_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_fast.training.kl_control import AdaptiveKLController, FixedKLController


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


def test_gae_by_hand():
    # γ = 0.9, λ = 0.8, γλ = 0.72, V after the last token = 0
    # t=2: δ = 1 − 0.3 = 0.7                         A2 = 0.7
    # t=1: δ = 0.9·0.3 − 0.4 = −0.13                  A1 = −0.13 + 0.72·0.7 = 0.374
    # t=0: δ = 0.9·0.4 − 0.5 = −0.14                  A0 = −0.14 + 0.72·0.374 = 0.12928
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3, dtype=torch.bool), 0.9, 0.8)
    close(advantages, [[0.12928, 0.374, 0.7]])
    close(returns, [[0.62928, 0.774, 1.0]])


def test_gae_stops_at_the_last_valid_token():
    # padding after t=1 carries junk reward/value that must be ignored
    # t=1: δ = 1 − 0.4 = 0.6; t=0: δ = 0.9·0.4 − 0.5 = −0.14, A0 = −0.14 + 0.72·0.6 = 0.292
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 9.0], [0.5, 0.4, 0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, 0.9, 0.8)
    close(advantages, [[0.292, 0.6, 0.0], [0.12928, 0.374, 0.7]])
    close(returns, [[0.792, 1.0, 0.0], [0.62928, 0.774, 1.0]])


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 2.0]])
    values = torch.tensor([[0.3, 0.1, -0.4]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    close(returns, [[1.9, 1.8, 2.0]])  # reward-to-go
    close(advantages, [[1.6, 1.7, 2.4]])


def test_whiten():
    # [1, 2, 3, 4]: mean 2.5, unbiased var 5/3
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    close(whiten(x, eps=0.0), (x - 2.5) / math.sqrt(5 / 3))
    # masked entry excluded from the statistics and returned as 0: mean 2, var 1
    masked = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]), eps=0.0)
    close(masked, [-1.0, 0.0, 1.0, 0.0])
    close(whiten(x, shift_mean=False, eps=0.0), (x - 2.5) / math.sqrt(5 / 3) + 2.5)


def test_grpo_by_hand():
    # group [1, 2, 3]: mean 2, std 1; group [0, 0, 4]: mean 4/3, std sqrt(16/3)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    s = math.sqrt(16 / 3)
    close(grpo_advantages(scores, 3, eps=0.0), [-1.0, 0.0, 1.0, -4 / 3 / s, -4 / 3 / s, 8 / 3 / s], atol=1e-5)
    close(grpo_advantages(scores, 3, scale_by_std=False), [-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3], atol=1e-6)
    # identical scores in a group: zero advantage, not NaN
    close(grpo_advantages(torch.tensor([2.0, 2.0]), 2), [0.0, 0.0])


def test_rloo_by_hand():
    # R_i − mean of the others: [1−2.5, 2−2, 3−1.5] and [0−2, 0−2, 4−0]
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    close(rloo_advantages(scores, 3), [-1.5, 0.0, 1.5, -2.0, -2.0, 4.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(scores, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(scores, 4)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3), returns, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller_by_hand():
    # β = 0.1, target 6, H = 10000, n = 64
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000.0)
    ctl.update(9.0, 64)  # e = clip(0.5) = 0.2 → β = 0.1·(1 + 0.2·64/1e4)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 1e4), rel=1e-12)
    ctl.value = 0.1
    ctl.update(6.6, 64)  # e = 0.1 (inside the clip)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 64 / 1e4), rel=1e-12)
    ctl.value = 0.1
    ctl.update(0.0, 64)  # e = clip(−1) = −0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 64 / 1e4), rel=1e-12)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match="kl_target"):
        AdaptiveKLController(0.1, target=-1.0, horizon=10.0)


def test_adaptive_kl_controller_floor_by_hand():
    """With floor = the starting β the target is a ceiling: β rises above the KL target, never falls below its start."""
    step = 0.2 * 128 / 500  # the largest relative change of one step: clipped error × n / H
    ctl = AdaptiveKLController(0.5, target=2.0, horizon=500.0, floor=0.5)
    assert ctl.update(0.0, 128) == 0.5  # e = −0.2 would give 0.5·(1 − step) < 0.5: held at the floor
    assert ctl.update(4.0, 128) == pytest.approx(0.5 * (1 + step), rel=1e-12)  # above the ceiling: β rises
    assert ctl.update(1.9, 128) == pytest.approx(0.5 * (1 + step) * (1 - 0.05 * 128 / 500), rel=1e-12)
    for _ in range(10):
        ctl.update(0.0, 128)
    assert ctl.value == 0.5
    lower = AdaptiveKLController(0.5, target=2.0, horizon=500.0, floor=0.46)
    assert lower.update(0.0, 128) == pytest.approx(0.5 * (1 - step), rel=1e-12)  # 0.474 > 0.46: no effect
    assert lower.update(0.0, 128) == 0.46  # 0.474·(1 − step) = 0.450 < 0.46
    no_floor = AdaptiveKLController(0.5, target=2.0, horizon=500.0)
    assert no_floor.update(0.0, 128) == pytest.approx(0.5 * (1 - step), rel=1e-12)  # Ziegler et al.'s controller
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict() and restored.floor == 0.5
    old = {k: v for k, v in no_floor.state_dict().items() if k != "floor"}  # a checkpoint from before the floor
    restored.load_state_dict(old)
    assert restored.floor == 0.0
    with pytest.raises(ValueError, match=r"kl_coef_min must be in \[0, kl_coef\]"):
        AdaptiveKLController(0.1, target=1.0, horizon=10.0, floor=0.2)
    with pytest.raises(ValueError, match="kl_coef_min"):
        AdaptiveKLController(0.1, target=1.0, horizon=10.0, floor=-0.1)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
