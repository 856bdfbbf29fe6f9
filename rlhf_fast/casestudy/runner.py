"""The one place that talks to the PPO loop (``rf.PPOConfig``, ``rf.train_ppo``).

If the loop's API changes, only this file changes. A case-study run is described by the loop's own
``rf.PPOConfig`` (every knob and its help written once, there): the baseline's
(:func:`baseline_ppo`) with the one change of its fix. :func:`run_ppo` trains a policy with it and
gives back the per-step metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Dict, List, Sequence

import rlhf_fast as rf

from . import world


def baseline_ppo() -> rf.PPOConfig:
    """The incident's PPO run: a small fixed β in the reward on the raw reward-model scale. Every other run
    of the case study is this with ONE change; only what differs from ``rf.PPOConfig``'s defaults is set
    (``seed``, ``out_dir`` and ``progress`` are each run's, set by :func:`run_ppo`)."""
    return rf.PPOConfig(
        kl_coef=0.01,
        steps=120,
        # enough UNSAFE prompts per step (~38 of 128 replies) that rare first tokens are sampled every step
        batch=128,
        minibatch_size=32,
        epochs=4,
        lr=3e-4,
        # linear decay to 0 over the run (as cleanrl and TRL do by default): the last steps fine-tune instead
        # of kicking rare tokens around, so the final policy is the run's, not one update's
        lr_schedule="linear",
        max_new_tokens=8,
        missing_eos_penalty=1.0,  # a reply cut at max_new_tokens loses 1 (common practice, every run)
        loss_backend="eager",
    )


def changes(base: rf.PPOConfig, run: rf.PPOConfig) -> Dict[str, object]:
    """The fields of ``run`` that differ from ``base``: what a run changes (in ``config.json``, ``details.json``)."""
    fields = [f.name for f in dataclasses.fields(run)]
    return {name: getattr(run, name) for name in fields if getattr(run, name) != getattr(base, name)}


def run_ppo(
    base: rf.PPOConfig,
    run: rf.PPOConfig,
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
    """Train ``policy`` in place with ``run`` (``base``, the baseline's config, with this run's change);
    returns one flat dict per step (also in ``out_dir/metrics.jsonl``).

    Each dict has the loop's diagnostics plus ``extra_metrics``' keys (and ``monitor``: the
    reward-hacking monitor's alerts of that step, which never reads ``extra_metrics``' evaluation
    numbers); the names the case study reads are ``score_norm_mean``, ``kl_ref_k1_sum``, ``kl_coef``,
    ``ratio_above``, ``clipfrac`` and ``response_length_mean``.
    """
    cfg = dataclasses.replace(run, seed=seed, out_dir=out_dir, progress=progress)
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
        json.dump({"ppo_config": dataclasses.asdict(cfg), "settings": changes(base, run)}, f, indent=2)
    return [r.to_dict() for r in records]


def describe(settings: rf.PPOConfig) -> str:
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
