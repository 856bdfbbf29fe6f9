"""The loss layer: options, input preparation, the eager reference, the per-token loss, the functional API,
autograd, fused-linear, vocab-parallel and the ``nn.Module``.

Never imports the training layer or ``transformers``; backends load on first use.
"""

from .aggregation import METRIC_NAMES, PPOLossOutput
from .functional import logprobs, ppo_loss
from .fused_linear import fused_linear_logprobs, fused_linear_ppo_loss
from .module import PPOLoss
from .options import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, LossOptions
from .token_loss import logprobs_ppo_loss

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "METRIC_NAMES",
    "POLICY_LOSSES",
    "LossOptions",
    "PPOLoss",
    "PPOLossOutput",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "logprobs",
    "logprobs_ppo_loss",
    "ppo_loss",
]
