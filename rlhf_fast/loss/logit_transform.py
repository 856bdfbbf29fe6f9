"""The logit transform of the fused-linear loss: the elementwise map a model applies to its logits before the
softmax (a logit scale, tanh soft-capping), applied in place to each chunk's logits, and its chain rule."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

_TRANSFORM_BLOCK_ELEMENTS = 1 << 20
"""Low-precision buffers are transformed in fp32 blocks of at most this many elements (4 MiB)."""


class LogitTransform(NamedTuple):
    """The elementwise map a model applies to its logits before the softmax.

    z ↦ s·z with ``scale`` s (Cohere's ``logit_scale``; Granite's 1 / ``logits_scaling``), then
    z ↦ c·tanh(z / c) with ``softcap`` c (Gemma 2/3's ``final_logit_softcapping``); None skips
    a step. The row backend sees the transformed logits; the chain rule turns its d(logits)
    back into the gradient of the linear layer's output: ·s, and ·(1 − tanh²) for the cap.
    """

    scale: Optional[float] = None
    softcap: Optional[float] = None

    @property
    def is_identity(self) -> bool:
        return self.scale is None and self.softcap is None

    @property
    def needs_spare(self) -> bool:
        """Whether the backward needs a second [chunk, V] buffer (the cap's derivative reads the logits)."""
        return self.softcap is not None

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform ``logits`` ``[rows, V]`` in place (fp32 math, one rounding for bf16 / fp16 buffers)."""
        if not self.is_identity:
            _blockwise(logits, None, self._forward)
        return logits

    def chain_(self, grad: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        """``grad`` ← grad·d(transformed)/dz, in place; ``transformed`` holds the transformed logits (soft-cap only)."""
        _blockwise(grad, transformed, self._backward)
        return grad

    def _forward(self, z: torch.Tensor, _unused) -> torch.Tensor:
        if self.scale is not None:
            z = z.mul_(self.scale)
        if self.softcap is not None:
            z = z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def _backward(self, grad: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        # d(c·tanh(s·z/c))/dz = s·(1 − t²), t = transformed / c (autograd's tanh backward reads tanh's output too)
        factor = transformed.div_(self.softcap).square_().neg_().add_(1.0)
        if self.scale is not None:
            factor = factor.mul_(self.scale)
        return grad.mul_(factor)


IDENTITY = LogitTransform()


def _blockwise(x: torch.Tensor, other: Optional[torch.Tensor], fn) -> None:
    """``x`` ← fn(x, other) in place (``other`` may be overwritten); bf16 / fp16 in fp32 blocks of rows."""
    if x.numel() == 0:
        return
    if x.dtype in (torch.float32, torch.float64):
        fn(x, other)
        return
    rows = max(1, _TRANSFORM_BLOCK_ELEMENTS // max(x.shape[-1], 1))
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        up = block.float()
        block.copy_(fn(up, None if other is None else other[start:start + rows].float()))


def check_transform(logit_scale, logit_softcap) -> LogitTransform:
    """The :class:`LogitTransform` of the keyword arguments (``ValueError`` naming a bad one)."""
    for name, value in (("logit_scale", logit_scale), ("logit_softcap", logit_softcap)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (or None for none), got {value!r}")
    return LogitTransform(None if logit_scale is None else float(logit_scale),
                          None if logit_softcap is None else float(logit_softcap))
