"""The training layer: reward model, PPO loop, advantages, KL control, checkpoints, data
parallelism and the command line, built on the loss layer (:mod:`rlhf_fast.loss`).

Data flows one way through a step (:func:`train`): rollout (:mod:`.rollout`) → update
(:mod:`.update`) → metrics (:mod:`.metrics`) → KL controller, log, checkpoint.
"""

from .advantages import ADVANTAGE_ESTIMATORS, gae_advantages, grpo_advantages, rloo_advantages, whiten
from .config import KL_PLACEMENTS, PPOConfig, validate
from .kl_control import AdaptiveKLController, FixedKLController
from .metrics import pearson, rollout_metrics
from .models import ValueHead, check_compatibility, critic_values, lm_head, response_hidden, token_logprobs
from .records import METRICS, Rollout, Samples, StepRecord
from .reward import (
    RewardModel,
    RewardTrainConfig,
    bradley_terry_loss,
    calibrate,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)
from .rollout import choose_prompts, collect_rollout, left_pad, sample_replies
from .trainer import train
from .update import clipped_value_loss, policy_loss, ppo_update

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_PLACEMENTS", "METRICS", "AdaptiveKLController", "FixedKLController", "PPOConfig",
    "RewardModel", "RewardTrainConfig", "Rollout", "Samples", "StepRecord", "ValueHead", "bradley_terry_loss",
    "calibrate", "check_compatibility", "choose_prompts", "clipped_value_loss", "collect_rollout", "critic_values",
    "gae_advantages", "grpo_advantages", "left_pad", "lm_head", "load_reward_model", "pearson", "policy_loss",
    "ppo_update", "response_hidden", "rloo_advantages", "rollout_metrics", "sample_replies", "save_reward_model",
    "token_logprobs", "train", "train_reward_model", "validate", "whiten",
]
