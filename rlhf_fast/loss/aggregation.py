"""Aggregation of per-token losses into the loss, the metrics, and the output every backend returns.

Every aggregation mode is linear in the per-token loss ℓ, so one weight per token describes
it (:func:`aggregation_weights`, loss = Σ w·ℓ) and a backward only ever needs w times the
upstream gradient. The metrics (:func:`loss_metrics`) and the output (:func:`finish`) are
shared by every backend, so they agree by construction.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

from ..backends.rows import RowParams


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """Differentiable fp32 scalar."""
    logprobs: torch.Tensor
    """Detached fp32 ``[...]`` (the leading shape of targets), 0 where masked."""
    entropy: torch.Tensor
    """Detached fp32 ``[...]``, 0 where masked."""
    metrics: Dict[str, torch.Tensor]
    """Detached fp32 scalars (see :data:`METRIC_NAMES`; no host sync inside the call)."""


def aggregation_weights(
    valid: torch.Tensor, loss_agg: str, global_num_tokens=None
) -> torch.Tensor:
    """Per-token weights w with loss = Σ w·ℓ; ``valid`` is a bool ``[...]`` mask.

    Every aggregation mode is linear in ℓ, so one weight per token describes it, and
    a backward only ever needs w (times the upstream gradient).
    """
    m = valid.to(torch.float32)
    if loss_agg == "token-mean":
        if global_num_tokens is None:
            denom = m.sum().clamp_min(1.0)
        elif isinstance(global_num_tokens, torch.Tensor):
            denom = global_num_tokens.to(device=m.device, dtype=torch.float32).clamp_min(1.0)
        else:
            denom = float(global_num_tokens)
        return m / denom
    num_seqs = m.shape[0]
    tokens_per_seq = m.sum(-1, keepdim=True)
    seqs_valid = (tokens_per_seq > 0).sum().to(torch.float32).clamp_min(1.0)
    if loss_agg == "seq-mean-token-sum":
        return m / seqs_valid
    if loss_agg == "seq-mean-token-mean":
        return m / (tokens_per_seq.clamp_min(1.0) * seqs_valid)
    if loss_agg == "seq-mean-token-sum-norm":
        return m / float(num_seqs * m.shape[1])
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


METRIC_NAMES = (
    "pg_loss",
    "kl",
    "entropy",
    "clipfrac",
    "clipfrac_lower",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "ratio_above",
    "ratio_below",
    "approx_kl",
)


@torch.no_grad()
def loss_metrics(
    valid: torch.Tensor,
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    pg: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    params: RowParams,
) -> Dict[str, torch.Tensor]:
    """The metrics of the contract: token means over valid tokens; fp32 scalars, 0 with no valid token, no host sync.

    fp64 inputs (the ground truth of the accuracy tests) keep fp64 metrics.
    """
    dtype = torch.float64 if ratio.dtype == torch.float64 else torch.float32
    v = valid.reshape(-1)
    count = v.sum()
    denom = count.clamp_min(1).to(dtype)

    def mean(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1).to(dtype)
        return torch.where(v, x, torch.zeros_like(x)).sum() / denom

    def fraction(flag: torch.Tensor) -> torch.Tensor:
        return mean(flag.to(dtype))

    r = ratio.reshape(-1).to(dtype)
    a = advantages.reshape(-1)
    zero = torch.zeros((), dtype=dtype, device=r.device)
    inf = torch.full((), float("inf"), dtype=dtype, device=r.device)
    above = r > 1.0 + params.clip_eps_high
    below = r < 1.0 - params.clip_eps_low
    clipped = ((a > 0) & above) | ((a < 0) & below)
    dual = (a < 0) & (r > params.dual_clip) if params.has_dual_clip else torch.zeros_like(above)
    return {
        "pg_loss": mean(pg),
        "kl": mean(kl),
        "entropy": mean(entropy),
        "clipfrac": fraction(clipped),
        "clipfrac_lower": fraction(dual),
        "ratio_mean": mean(r),
        # the appended ±inf keeps the reduction defined when there are no tokens at all (N = 0)
        "ratio_min": torch.where(count > 0, torch.cat([torch.where(v, r, inf), inf.view(1)]).amin(), zero),
        "ratio_max": torch.where(count > 0, torch.cat([torch.where(v, r, -inf), -inf.view(1)]).amax(), zero),
        "ratio_above": fraction(above),
        "ratio_below": fraction(below),
        "approx_kl": mean((r - 1.0) - log_ratio.reshape(-1)),
    }


def finish(
    loss: torch.Tensor,
    logprobs: torch.Tensor,  # [N]
    entropy: torch.Tensor,  # [N]
    ratio: torch.Tensor,  # [N]
    pg: torch.Tensor,  # [N]
    kl: torch.Tensor,  # [N]
    valid: torch.Tensor,  # [N] bool
    shape: torch.Size,  # leading shape of the targets
    advantages: torch.Tensor,  # [N]
    old_logprobs: Optional[torch.Tensor],  # [N]
    params: RowParams,
) -> PPOLossOutput:
    """The output of a fused backend's per-token results: metrics, and masked outputs zeroed."""
    log_ratio = logprobs - old_logprobs if old_logprobs is not None else torch.zeros_like(logprobs)
    metrics = loss_metrics(valid, advantages, ratio, log_ratio, pg, kl, entropy, params)
    zeros = torch.zeros_like(logprobs)
    lp_out = torch.where(valid, logprobs, zeros).view(shape)
    entropy_out = torch.where(valid, entropy, zeros).view(shape)
    return PPOLossOutput(loss, lp_out, entropy_out, metrics)
