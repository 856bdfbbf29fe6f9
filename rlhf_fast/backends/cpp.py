"""The C++ CPU backend: ``torch.ops.rlhf_fast.*`` (csrc/) as a :class:`~rlhf_fast.backends.RowOps`.

Importing this module defines the op schemas and fakes (:mod:`.ops`), then loads the compiled
extension ``rlhf_fast._C``, which registers their CPU implementations; it raises
``ImportError`` when the extension is not built, and :mod:`rlhf_fast.backends` remembers why.
"""

from __future__ import annotations

import torch

from . import ops
from .rows import RowOps, RowParams, RowStats, TokenResults

if not hasattr(torch.ops.rlhf_fast, "ppo_forward"):  # a re-import after a failed load defines nothing twice
    ops.define_cpp_ops("rlhf_fast")
try:
    from .. import _C  # noqa: F401  (registers the implementations of torch.ops.rlhf_fast.*)
except ImportError as exc:
    raise ImportError(
        f"the C++ extension rlhf_fast._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` (a C++ compiler and torch installed, "
        "RLHF_FAST_BUILD_EXT unset or 1)"
    ) from exc

_ops = torch.ops.rlhf_fast


def cpu_capability() -> str:
    """Which kernel build runs here: ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``."""
    return _ops.cpu_capability()


def forward(
    logits: torch.Tensor,  # [B, T, V], stride 1 on V
    targets: torch.Tensor,  # [N] int32 | int64, sanitised
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: torch.Tensor | None,  # [N] fp32
    ref_logprobs: torch.Tensor | None,  # [N] fp32
    params: RowParams,
) -> TokenResults:
    """One pass per row: lp, H, m, log s, ratio, pg, kl, ℓ, g = dℓ/d lp and the two log scales, fp32 ``[N]``."""
    out = _ops.ppo_forward(
        logits, targets, advantages, old_logprobs, ref_logprobs,
        1.0 - params.clip_eps_low, 1.0 + params.clip_eps_high, params.dual_clip, params.kl_coef,
        params.kl_estimator, params.entropy_coef, params.temperature,
    )
    return TokenResults(*out)


def backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out,
             outside=None) -> None:
    """Writes d(loss)/d(logits) into ``out`` (which may be ``logits`` itself), recomputing p from the logits."""
    if out is logits:  # identity, not data_ptr: it also holds for the fake tensors of torch.compile
        _ops.ppo_backward_inplace(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature,
                                  outside)
    else:
        _ops.ppo_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out,
                          outside)


def logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool) -> RowStats:
    """Log-probs ``[N]`` (and entropy ``[N]`` when asked) and the row statistics, in one pass per row."""
    lp, entropy, row_max, log_sum = _ops.logprobs(logits, targets, temperature, with_entropy)
    return RowStats(lp, entropy if with_entropy else None, row_max, log_sum)


ROW_OPS = RowOps(forward, backward, logprobs)
