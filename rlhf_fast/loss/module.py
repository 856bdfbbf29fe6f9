"""``rf.PPOLoss``: the options of :func:`rlhf_fast.ppo_loss` held in a module."""

from __future__ import annotations

from typing import Optional

import torch

from .aggregation import PPOLossOutput
from .functional import ppo_loss
from .options import OPTION_NAMES, LossOptions

_CALL_OPTIONS = frozenset({"global_num_tokens", "global_num_sequences", "inplace_backward", "grad_in_forward",
                           "validate", "backend", "process_group"})
"""Keyword arguments of ppo_loss that are not loss options but may be fixed at construction too."""
_PER_CALL_TENSORS = frozenset({"rollout_logprobs", "cu_seqlens"})
"""Per-call tensors of ppo_loss, keywords of :meth:`PPOLoss.forward`."""


class PPOLoss(torch.nn.Module):
    """``PPOLoss(clip_eps=0.2, kl_coef=0.05, ...)(logits, targets, advantages, ...)``.

    Takes every loss option (:class:`~rlhf_fast.LossOptions`, or ``options=LossOptions(...)``)
    and the call options of :func:`rlhf_fast.ppo_loss` (``backend``, ``validate``,
    ``inplace_backward``, ...). The loss options are validated at construction, so a bad
    configuration fails before any data is seen.
    """

    def __init__(self, options: Optional[LossOptions] = None, **kwargs) -> None:
        super().__init__()
        unknown = set(kwargs) - OPTION_NAMES - _CALL_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown PPOLoss option(s) {sorted(unknown)}; valid: {sorted(OPTION_NAMES | _CALL_OPTIONS)}"
            )
        self.loss_options = LossOptions.from_kwargs(options, {k: v for k, v in kwargs.items() if k in OPTION_NAMES},
                                                    "PPOLoss")
        self.call_options = {k: v for k, v in kwargs.items() if k in _CALL_OPTIONS}

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        old_logprobs: Optional[torch.Tensor] = None,
        ref_logprobs: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        **per_call,
    ) -> PPOLossOutput:
        """``per_call``: this call's ``rollout_logprobs``, ``cu_seqlens`` and call options (``global_num_tokens``)."""
        unknown = set(per_call) - _CALL_OPTIONS - _PER_CALL_TENSORS
        if unknown:
            raise ValueError(f"PPOLoss.forward: unknown keyword(s) {sorted(unknown)}; valid: "
                             f"{sorted(_CALL_OPTIONS | _PER_CALL_TENSORS)}")
        return ppo_loss(logits, targets, advantages, old_logprobs, ref_logprobs, mask, options=self.loss_options,
                        **{**self.call_options, **per_call})

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in self.loss_options.as_dict().items() if getattr(defaults, k) != v}
        return ", ".join(f"{k}={v!r}" for k, v in {**changed, **self.call_options}.items())
