"""The case study's settings: the candidate fixes and every setting of a run (:class:`CaseStudyConfig`).

Read by every stage (world, models, metrics, the PPO runs, the report); imports only the world,
the models and the baseline's PPO config, so no stage imports another to learn a setting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import rlhf_fast as rf

from . import models, world
from .runner import baseline_ppo

FIXES = ("adaptive-kl", "adaptive-kl-raw", "reward-norm", "early-stop", "tight-clip", "dual-clip", "kl-loss-k3")
"""Candidate one-change fixes of the incident; ``adaptive-kl`` is the recommended one.

``adaptive-kl`` is the KL budget held by the adaptive controller on the normalised reward;
``adaptive-kl-raw`` and ``reward-norm`` are its two parts alone.
"""
ABLATIONS = FIXES[1:]
"""What ``--ablations`` runs next to the recommended fix: every other candidate, each alone."""


def check_fixes(names) -> None:
    """Raise naming the first of ``names`` that is not one of :data:`FIXES`."""
    for name in names:
        if name not in FIXES:
            raise ValueError(f"unknown fix {name!r}; choose one of {FIXES}")


def reward_training() -> rf.RewardTrainConfig:
    """The case study's fit of the reward model: only what differs from ``rf.RewardTrainConfig``'s defaults."""
    return rf.RewardTrainConfig(
        lr=1e-3,
        epochs=4,
        batch_size=64,
        # The centring term pins each pair's mean score near 0. Bradley–Terry leaves each prompt's offset free;
        # unpinned, the offsets of the prompt kinds differ at random and, with a value head that starts at 0 and
        # advantages whitened over the batch, the first PPO updates push down whatever the reference says to
        # the kind with the lowest offset.
        center_coef=0.05,
    )


@dataclass(frozen=True)
class CaseStudyConfig:
    """Every setting of the case study; the defaults are the calibrated demo."""

    seed: int = 0
    """Seed of every stage (data, SFT, reward model, PPO, evaluation)."""
    scenario: world.WorldConfig = field(default_factory=world.WorldConfig)
    """Prompt mix and the SFT / labelled-pair distributions."""
    gold: world.GoldJudge = field(default_factory=world.GoldJudge)
    labellers: world.Labellers = field(default_factory=world.Labellers)
    model: models.ModelConfig = field(default_factory=models.ModelConfig)
    sft: models.SFTConfig = field(default_factory=models.SFTConfig)
    rm_pairs: int = 12000
    """Labelled preference pairs for the reward model."""
    rm_training: rf.RewardTrainConfig = field(default_factory=reward_training)
    """The reward model's fit (``seed`` and ``progress`` are the case study's)."""
    rm_anneal_epochs: int = 2
    """Extra epochs at ``rm_training.lr / 5`` (a constant-lr fit leaves the scores noisy)."""
    rm_heldout: float = 0.1
    calibration_samples: int = 2048
    """Reference samples whose RM scores define mean 0 / std 1."""
    train_prompts: int = 4096
    """Prompt pool of the PPO runs."""
    eval_prompts: int = 2048
    """Mixed evaluation prompts (gold, proxy, KL, length, salesy share)."""
    eval_unsafe_prompts: int = 1024
    """Extra UNSAFE evaluation prompts, so the refusal rate is measured to about ±1 point."""
    ppo: rf.PPOConfig = field(default_factory=baseline_ppo)
    """The baseline's PPO run (the incident: small fixed β in the reward, raw reward-model scale); every other
    run is it with one change (:meth:`fix_ppo`), and every stage samples as it does (``max_new_tokens``,
    ``temperature``, ``missing_eos_penalty``)."""
    fix_kl_target: float = 2.0
    """KL budget to the reference, nats per reply (the fix)."""
    fix_kl_coef: Optional[float] = None
    """Starting β of the adaptive controller (the fix); None: :func:`budget_beta` of the target, 1/√(2·target)."""
    fix_kl_ceiling: bool = True
    """The KL budget is a ceiling: β rises to hold it and never falls below its start (``kl_coef_min``).
    False: Ziegler et al.'s set-point controller, which also lowers β until the policy spends the budget."""
    fix_kl_horizon: float = 500.0
    """Adaptive controller horizon, in replies."""
    kl_loss_coef: float = 0.15
    """β of the ``kl-loss-k3`` ablation (fixed, in the loss, on the raw reward)."""
    sweep_targets: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """KL targets of ``--sweep``."""
    threads: int = 1
    """torch threads (fixed, so a run is reproducible on one machine)."""

    def fix_ppo(self, fix: str = "adaptive-kl", kl_target: Optional[float] = None) -> rf.PPOConfig:
        """The baseline's PPO run (:attr:`ppo`) with ONE change (``fix``, one of :data:`FIXES`)."""
        base = self.ppo
        if fix == "adaptive-kl":
            target = self.fix_kl_target if kl_target is None else kl_target
            start = budget_beta(target) if self.fix_kl_coef is None else self.fix_kl_coef
            return dataclasses.replace(
                base,
                kl_coef=start,
                adaptive_kl=True,
                kl_target=target,
                kl_horizon=self.fix_kl_horizon,
                kl_coef_min=start if self.fix_kl_ceiling else None,
                reward_normalize=True,
            )
        if fix == "adaptive-kl-raw":
            return dataclasses.replace(self.fix_ppo("adaptive-kl", kl_target), reward_normalize=False)
        if fix == "early-stop":
            return dataclasses.replace(base, early_stop_approx_kl=0.01)
        if fix == "tight-clip":
            return dataclasses.replace(base, clip_eps=0.1)
        if fix == "dual-clip":
            return dataclasses.replace(base, dual_clip=3.0)
        if fix == "reward-norm":
            return dataclasses.replace(base, reward_normalize=True)
        if fix == "kl-loss-k3":
            return dataclasses.replace(base, kl_placement="loss", kl_estimator="k3", kl_coef=self.kl_loss_coef)
        raise ValueError(f"unknown fix {fix!r}; choose one of {FIXES}")


def budget_beta(kl_target: float) -> float:
    """The starting β of the fix: 1/√(2·kl_target), the β at which a policy tilted from the reference
    by a reward of unit variance, π ∝ π_ref·exp(r/β), is ``kl_target`` nats away from it.

    For small tilts KL(π‖π_ref) ≈ Var(r)/(2β²) (second order in 1/β; exact for a Gaussian reward).
    The normalised reward has variance 1 over reference replies, of which only the part within a
    prompt can be bought with KL, so this is an upper estimate of the β that holds the budget: the
    run starts at or above the price the budget needs, never below it.
    """
    if not kl_target > 0:
        raise ValueError(f"kl_target must be > 0 nats, got {kl_target}")
    return 1.0 / math.sqrt(2.0 * kl_target)


def quick_config(seed: int = 0) -> CaseStudyConfig:
    """A smaller case study for smoke tests (under 2 minutes); the bar is not expected to hold."""
    return CaseStudyConfig(
        seed=seed,
        sft=dataclasses.replace(models.SFTConfig(), examples=2000, epochs=2),
        rm_pairs=2000,
        rm_training=dataclasses.replace(reward_training(), epochs=2),
        rm_anneal_epochs=0,
        calibration_samples=512,
        train_prompts=1024,
        eval_prompts=512,
        eval_unsafe_prompts=256,
        ppo=dataclasses.replace(baseline_ppo(), steps=12, batch=32, minibatch_size=16, epochs=2),
        sweep_targets=(1.0, 4.0),
    )
