"""``rf.PPOLoss``: the keyword configuration of :func:`rlhf_fast.ppo_loss` held in a module."""

from __future__ import annotations

from typing import Optional

import torch

from .config import make_config
from .functional import PPOLossOutput, ppo_loss


class PPOLoss(torch.nn.Module):
    """``PPOLoss(clip_eps=0.2, kl_coef=0.05, ...)(logits, targets, advantages, ...)``.

    Takes every keyword option of :func:`rlhf_fast.ppo_loss` and checks the scalar
    ones at construction, so a bad configuration fails before any data is seen.
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown PPOLoss option(s) {sorted(unknown)}; valid: {sorted(_OPTIONS)}")
        scalar = {k: v for k, v in options.items() if k in _CONFIG_OPTIONS}
        make_config(**scalar, has_ref=True)  # the kl_coef/ref pairing is checked per call
        self.options = dict(options)

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        old_logprobs: Optional[torch.Tensor] = None,
        ref_logprobs: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> PPOLossOutput:
        return ppo_loss(logits, targets, advantages, old_logprobs, ref_logprobs, mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_CONFIG_OPTIONS = {
    "clip_eps", "clip_eps_high", "dual_clip", "kl_coef", "kl_estimator", "entropy_coef", "temperature",
}
_OPTIONS = _CONFIG_OPTIONS | {"loss_agg", "global_num_tokens", "inplace_backward", "validate", "backend"}
