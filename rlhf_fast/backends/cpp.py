"""The C++ CPU backend: ``torch.ops.rlhf_fast.*`` (csrc/) as a :class:`~rlhf_fast.backends.RowOps`.

Importing this module loads the compiled extension ``rlhf_fast._C`` and raises
``ImportError`` when it is not built; :mod:`rlhf_fast.backends` catches that and
remembers why. The operators are registered with schemas (``TORCH_LIBRARY``); the fake
implementations below give ``torch.compile`` their output shapes without running them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .rows import RowOps, RowParams, TokenResults

try:
    from .. import _C  # noqa: F401  (registers torch.ops.rlhf_fast.*)
except ImportError as exc:
    raise ImportError(
        f"the C++ extension rlhf_fast._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` (a C++ compiler and torch installed, "
        "RLHF_FAST_BUILD_EXT unset or 1)"
    ) from exc

_ops = torch.ops.rlhf_fast


def _num_rows(logits: torch.Tensor) -> int:
    return logits.shape[0] * logits.shape[1]


@torch.library.register_fake("rlhf_fast::ppo_forward")
def _ppo_forward_fake(logits, targets, advantages, old_logprobs, ref_logprobs, *_scalars):
    rows = _num_rows(logits)
    return tuple(logits.new_empty((rows,), dtype=torch.float32) for _ in range(8))


@torch.library.register_fake("rlhf_fast::ppo_backward")
def _ppo_backward_fake(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature, out):
    return None


@torch.library.register_fake("rlhf_fast::logprobs")
def _logprobs_fake(logits, targets, temperature, with_entropy):
    rows = _num_rows(logits)
    lp = logits.new_empty((rows,), dtype=torch.float32)
    return lp, logits.new_empty((rows if with_entropy else 0,), dtype=torch.float32)


def cpu_capability() -> str:
    """Which kernel build runs here: ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``."""
    return _ops.cpu_capability()


def forward(
    logits: torch.Tensor,  # [B, T, V], stride 1 on V
    targets: torch.Tensor,  # [N] int32 | int64, sanitised
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: Optional[torch.Tensor],  # [N] fp32
    ref_logprobs: Optional[torch.Tensor],  # [N] fp32
    cfg: RowParams,
) -> TokenResults:
    """One pass per row: lp, H, lse, ratio, pg, kl, ℓ and g = dℓ/d lp, each fp32 ``[N]``."""
    out = _ops.ppo_forward(
        logits, targets, advantages, old_logprobs, ref_logprobs,
        cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip, cfg.kl_coef, cfg.kl_estimator,
        cfg.entropy_coef, cfg.temperature,
    )
    return TokenResults(*out)


def backward(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    lse: torch.Tensor,  # [N] fp32
    entropy: torch.Tensor,  # [N] fp32
    coef_logprob: torch.Tensor,  # [N] fp32
    coef_entropy: torch.Tensor,  # [N] fp32
    temperature: float,
    out: torch.Tensor,  # [B, T, V], logits' dtype; may be logits itself
) -> None:
    """Writes d(loss)/d(logits) into ``out``, recomputing p from the logits and lse."""
    _ops.ppo_backward(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature, out)


def logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """No-grad log-probs ``[N]`` (and entropy ``[N]`` when asked) in one pass per row."""
    lp, entropy = _ops.logprobs(logits, targets, temperature, with_entropy)
    return lp, (entropy if with_entropy else None)


ROW_OPS = RowOps(forward, backward, logprobs)
