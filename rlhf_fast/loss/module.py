"""``rf.PPOLoss``: the options of :func:`rlhf_fast.ppo_loss` held in a module."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .aggregation import PPOLossOutput
from .functional import ppo_loss
from .inputs import TENSORS
from .options import OPTION_NAMES, LossOptions

_FORWARD = [p for p in inspect.signature(ppo_loss).parameters.values() if p.name not in OPTION_NAMES | {"options"}]
"""The parameters of :meth:`PPOLoss.forward`: those of ppo_loss but the loss options, which the module holds."""
_PER_CALL = frozenset(p.name for p in _FORWARD)
"""What :meth:`PPOLoss.forward` takes by keyword."""
_CALL_OPTIONS = frozenset(p.name for p in _FORWARD if p.kind is p.KEYWORD_ONLY) - set(TENSORS)
"""Keyword arguments of ppo_loss that are not loss options nor tensors: they may be fixed at construction too."""


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

    def forward(self, logits: torch.Tensor, *tensors: torch.Tensor, **per_call) -> PPOLossOutput:
        """The loss of this call's tensors (as :func:`rlhf_fast.ppo_loss` takes them) and call options
        (``global_num_tokens``, ..., replacing those given at construction)."""
        unknown = set(per_call) - _PER_CALL
        if unknown:
            raise ValueError(f"PPOLoss.forward: unknown keyword(s) {sorted(unknown)}; valid: {sorted(_PER_CALL)}")
        return ppo_loss(logits, *tensors, options=self.loss_options, **{**self.call_options, **per_call})

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + _FORWARD,
        return_annotation=inspect.signature(ppo_loss).return_annotation)

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in self.loss_options.as_dict().items() if getattr(defaults, k) != v}
        return ", ".join(f"{k}={v!r}" for k, v in {**changed, **self.call_options}.items())
