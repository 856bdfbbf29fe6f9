"""rlhf_fast: a fused, trustworthy PPO loss for RLHF (see SPEC.md in the docs).

``import rlhf_fast`` is lean: it never imports triton, touches CUDA or compiles
anything; backends load on first use.
"""

from .config import KL_ESTIMATORS, LOSS_AGGREGATIONS
from .functional import PPOLossOutput, logprobs, ppo_loss
from .module import PPOLoss

__version__ = "0.1.0"

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PPOLoss",
    "PPOLossOutput",
    "logprobs",
    "ppo_loss",
]
