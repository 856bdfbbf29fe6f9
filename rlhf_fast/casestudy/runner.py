"""The one place that talks to the PPO loop (``rf.PPOConfig``, ``rf.train_ppo``).

If the loop's API changes, only this file changes. The case study describes a PPO run
by :class:`PPOSettings` (the knobs it varies) and gets back the per-step metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import rlhf_fast as rf

from . import world


@dataclass(frozen=True)
class PPOSettings:
    """What distinguishes the case study's PPO runs; shared knobs live in :class:`CommonPPO`."""

    kl_coef: float
    """β: fixed, or the adaptive controller's starting value."""
    adaptive_kl: bool = False
    """Adapt β toward ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: Optional[float] = None
    """KL budget to the reference, nats per reply (k1 summed over tokens)."""
    kl_horizon: float = 2000.0
    """Controller horizon, in replies."""
    kl_coef_min: Optional[float] = None
    """Floor of the adaptive β (None: none); equal to ``kl_coef``, ``kl_target`` is a ceiling."""
    reward_normalize: bool = False
    """Score = (raw − mean) / std on reference samples, instead of the raw RM score."""
    kl_placement: str = "reward"
    """"reward" (−β·k1 per token) or "loss" (β·kl_estimator in the PPO loss)."""
    kl_estimator: str = "k3"
    clip_eps: float = 0.2
    dual_clip: Optional[float] = None
    early_stop_approx_kl: Optional[float] = None


@dataclass(frozen=True)
class CommonPPO:
    """Knobs every run of one case study shares (same seed, same budget)."""

    steps: int = 120
    batch: int = 128
    """Replies per step: enough UNSAFE prompts per step (~38) that rare first tokens are sampled every step."""
    minibatch_size: int = 32
    epochs: int = 4
    lr: float = 3e-4
    lr_schedule: str = "linear"
    """Linear decay to 0 over the run (as cleanrl and TRL do by default): the last steps fine-tune instead of
    kicking rare tokens around, so the final policy is the run's, not one update's."""
    max_new_tokens: int = 8
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a reply cut at max_new_tokens (common practice, both runs)."""
    loss_backend: str = "eager"


def make_config(common: CommonPPO, settings: PPOSettings, seed: int, out_dir: str, progress: bool):
    """The loop's ``PPOConfig`` for one run."""
    options = dict(
        seed=seed,
        steps=common.steps,
        batch=common.batch,
        samples_per_prompt=1,
        minibatch_size=common.minibatch_size,
        epochs=common.epochs,
        lr=common.lr,
        lr_schedule=common.lr_schedule,
        max_new_tokens=common.max_new_tokens,
        temperature=common.temperature,
        clip_eps=settings.clip_eps,
        dual_clip=settings.dual_clip,
        loss_backend=common.loss_backend,
        kl_coef=settings.kl_coef,
        kl_placement=settings.kl_placement,
        kl_estimator=settings.kl_estimator,
        adaptive_kl=settings.adaptive_kl,
        kl_horizon=settings.kl_horizon,
        kl_coef_min=settings.kl_coef_min if settings.adaptive_kl else None,
        reward_normalize=settings.reward_normalize,
        advantage_estimator="gae",
        gamma=common.gamma,
        lam=common.lam,
        whiten=True,
        vf_coef=common.vf_coef,
        max_grad_norm=common.max_grad_norm,
        early_stop_approx_kl=settings.early_stop_approx_kl,
        missing_eos_penalty=common.missing_eos_penalty,
        out_dir=out_dir,
        checkpoint_every=0,
        progress=progress,
    )
    if settings.kl_target is not None:
        options["kl_target"] = settings.kl_target
    return rf.PPOConfig(**options)


def run_ppo(
    common: CommonPPO,
    settings: PPOSettings,
    *,
    seed: int,
    policy,
    reference,
    reward_model,
    prompts: Sequence[Sequence[int]],
    extra_metrics: Callable[[List[List[int]], List[List[int]]], Dict[str, float]],
    out_dir: str,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """Train ``policy`` in place; returns one flat dict per step (also in ``out_dir/metrics.jsonl``).

    Each dict has the loop's diagnostics plus ``extra_metrics``' keys (and ``monitor``: the
    reward-hacking monitor's alerts of that step, which never reads ``extra_metrics``' evaluation
    numbers); the names the case study reads are ``score_norm_mean``, ``kl_ref_k1_sum``, ``kl_coef``,
    ``ratio_above``, ``clipfrac`` and ``response_length_mean``.
    """
    cfg = make_config(common, settings, seed, out_dir, progress)
    monitor = rf.RewardHackingMonitor(  # the loop's default monitor, naming the world's tokens
        trainer="rlhf_fast", kl_penalty=cfg.kl_placement, clip_eps=cfg.clip_eps,
        decode=lambda token_id: world.decode([token_id]),
    )
    records = rf.train_ppo(
        cfg,
        policy,
        reference,
        reward_model,
        [list(p) for p in prompts],
        eos_token_id=world.EOS,
        pad_token_id=world.PAD,
        extra_metrics=extra_metrics,
        monitor=monitor,
    )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(
            {"ppo_config": dataclasses.asdict(cfg), "settings": dataclasses.asdict(settings)}, f, indent=2
        )
    return [r.to_dict() for r in records]


def describe(settings: PPOSettings) -> str:
    """One line saying what a PPO run changes (for progress output and the report)."""
    parts = []
    if settings.adaptive_kl and settings.kl_coef_min is not None and settings.kl_coef_min >= settings.kl_coef:
        parts.append(
            f"adaptive KL ceiling of {settings.kl_target:g} nats/reply, β from {settings.kl_coef:.3g} and never "
            f"below (horizon {settings.kl_horizon:g} replies)"
        )
    elif settings.adaptive_kl:
        parts.append(
            f"adaptive KL from β = {settings.kl_coef:.3g} toward {settings.kl_target:g} nats/reply "
            f"(horizon {settings.kl_horizon:g} replies)"
        )
    elif settings.kl_placement == "loss":
        parts.append(f"KL in the loss ({settings.kl_estimator}), β = {settings.kl_coef:g}")
    else:
        parts.append(f"fixed β = {settings.kl_coef:g} in the reward")
    parts.append("normalised reward" if settings.reward_normalize else "raw reward")
    if settings.early_stop_approx_kl:
        parts.append(f"early stop at approx-KL {settings.early_stop_approx_kl:g}")
    if settings.clip_eps != 0.2:
        parts.append(f"clip ε = {settings.clip_eps:g}")
    if settings.dual_clip:
        parts.append(f"dual clip c = {settings.dual_clip:g}")
    return ", ".join(parts)
