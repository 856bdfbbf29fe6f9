"""rlhf_fast: a fused, trustworthy PPO loss for RLHF (see SPEC.md in the docs).

``import rlhf_fast`` is lean: it never imports triton, touches CUDA or compiles
anything; backends load on first use.
"""

from .config import KL_ESTIMATORS, LOSS_AGGREGATIONS
from .functional import PPOLossOutput, logprobs, ppo_loss
from .fused_linear import fused_linear_logprobs, fused_linear_ppo_loss
from .module import PPOLoss

__version__ = "0.1.0"

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PPOLoss",
    "PPOLossOutput",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "logprobs",
    "ppo_loss",
]

# Training side (reward model, PPO loop): imported on first attribute access, so that
# ``import rlhf_fast`` stays lean (no transformers, no tqdm).
_LAZY_EXPORTS = {
    "RewardModel": "reward", "RewardTrainConfig": "reward", "bradley_terry_loss": "reward",
    "train_reward_model": "reward", "calibrate": "reward", "save_reward_model": "reward",
    "load_reward_model": "reward",
    "PPOConfig": "ppo", "StepRecord": "ppo", "Rollout": "ppo", "validate_ppo_config": "ppo.validate",
    "train_ppo": "ppo.train",
    "gae_advantages": "advantages", "grpo_advantages": "advantages", "rloo_advantages": "advantages",
    "whiten": "advantages",
    "AdaptiveKLController": "kl_control", "FixedKLController": "kl_control",
}


def __getattr__(name: str):
    target = _LAZY_EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
    import importlib

    module_name, _, attr = target.partition(".")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), attr or name)
