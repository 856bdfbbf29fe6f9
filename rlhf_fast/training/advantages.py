"""Advantage estimators for the PPO loop: GAE (with a critic), GRPO and RLOO (critic-free).

Shapes: ``B`` sequences, ``T`` response positions. ``mask [B, T]`` marks the valid
response tokens (up to and including EOS); everything after it is padding.
Group estimators expect the ``k`` samples of one prompt to be contiguous
(``scores.view(-1, k)`` is one row per prompt).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..registry import Registry


class AdvantageEstimator(NamedTuple):
    """How the loop turns one step's rewards into advantages."""

    compute: Callable  # (rewards [B, R], values [B, R] | None, mask [B, R], cfg) -> (advantages, returns | None)
    needs_critic: bool  # values of a critic are required
    per_token: bool  # advantages are [B, R] (else [B], one per reply)


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
"""Advantage estimators by name (``PPOConfig.advantage_estimator``); register new ones here."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when nothing is valid)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over ``mask`` (Bessel-corrected when ``unbiased`` and n > 1)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * mask).sum() / n.clamp(min=1.0)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the valid entries; padding is returned as 0.

    ``shift_mean=False`` only rescales (the mean is added back), as some GAE variants do.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens.

    rewards, values, mask: ``[B, T]``; ``values[:, t]`` is V of the state before token t.
    δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t and A_t = δ_t + γλ·m_{t+1}·A_{t+1}: the value after
    the last valid token (EOS or the length limit) is taken as 0 — a truncated reply is
    scored as final by the reward model, so there is nothing left to bootstrap.
    Returns ``(advantages [B, T], returns [B, T])``, 0 at padding; returns = A + V.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        # a padded position passes nothing back: the chain restarts at the last valid token
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"scores of length {scores.shape[0]} do not split into groups of {group_size}")
    return scores.view(-1, group_size)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised advantages (Shao et al. 2024): ``(R_i − mean_g) / (std_g + eps)``.

    scores: ``[B]`` sequence rewards, B = prompts × group_size, groups contiguous.
    ``std_g`` is the unbiased std of the group (0 for a group of one).
    ``scale_by_std=False`` only centres (Dr. GRPO, Liu et al. 2025). Returns ``[B]``.
    """
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (Ahmadian et al. 2024): ``R_i − mean_{j≠i} R_j``.

    scores: ``[B]`` sequence rewards, groups of ``group_size ≥ 2`` contiguous. Returns ``[B]``.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {group_size}")
    groups = _groups(scores, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns) over the valid tokens (0 when Var(returns) = 0)."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return 0.0
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


# ----------------------------------------------------------------------------- the registered estimators
# cfg: the loop's PPOConfig (gamma, lam, samples_per_prompt, group_std_normalize).


def _gae(rewards, values, mask, cfg):
    return gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)


def _grpo(rewards, values, mask, cfg):
    return grpo_advantages(rewards.sum(dim=1), cfg.samples_per_prompt, cfg.group_std_normalize), None


def _rloo(rewards, values, mask, cfg):
    return rloo_advantages(rewards.sum(dim=1), cfg.samples_per_prompt), None


ADVANTAGE_ESTIMATORS.register("gae", AdvantageEstimator(_gae, needs_critic=True, per_token=True))
ADVANTAGE_ESTIMATORS.register("grpo", AdvantageEstimator(_grpo, needs_critic=False, per_token=False))
ADVANTAGE_ESTIMATORS.register("rloo", AdvantageEstimator(_rloo, needs_critic=False, per_token=False))
