"""Aggregation of per-token losses into the loss, the metrics, and the output every backend returns.

Every aggregation mode is linear in the per-token loss ℓ, so one weight per token describes
it (:func:`aggregation_weights`, loss = Σ w·ℓ) and a backward only ever needs w times the
upstream gradient. The metrics (:func:`loss_metrics`) and the output (:func:`finish`) are
shared by every backend, so they agree by construction.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

from ..backends.rows import log_scale_of
from .policy import Sequences


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
    valid: torch.Tensor,  # [N] bool
    loss_agg: str,
    sequences: Optional[Sequences] = None,
    global_num_tokens=None,
    norm_length: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    global_num_sequences=None,
) -> torch.Tensor:
    """Per-token weights w ``[N]`` with loss = Σ w·ℓ, in ``dtype`` (fp64 for the fp64 ground truth).

    The ``seq-*`` modes need ``sequences``; ``seq-mean-token-sum-norm`` divides by
    B·``norm_length``. ``global_num_sequences`` replaces the number of sequences every ``seq-*``
    mode divides by (B_valid, or B for ``-norm``): the sequences of a whole mini-batch split into
    micro-batches or data-parallel ranks, as verl's ``global_batch_size``.
    """
    m = valid.to(dtype)
    if loss_agg == "token-mean":
        if global_num_tokens is None:
            denom = m.sum().clamp_min(1.0)
        else:
            denom = _as_denominator(global_num_tokens, m)
        return m / denom
    if global_num_sequences is not None:
        count = _as_denominator(global_num_sequences, m)
    if loss_agg == "seq-mean-token-sum-norm":
        if global_num_sequences is not None:
            return m / (count * norm_length)
        return m / float(sequences.count * norm_length)
    tokens_per_seq = sequences.sum(m)
    seqs_valid = count if global_num_sequences is not None else (tokens_per_seq > 0).sum().to(dtype).clamp_min(1.0)
    if loss_agg == "seq-mean-token-sum":
        return m / seqs_valid
    if loss_agg == "seq-mean-token-mean":
        return m / (sequences.expand(tokens_per_seq).clamp_min(1.0) * seqs_valid)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def _common_scale(values: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """One scale S for a sum of values·e^log_scales: the largest term divided by e^S is at most
    e^SCALE_FROM, so the scaled terms and their sum stay finite (0 when nothing exceeds e^SCALE_FROM)."""
    magnitudes = (log_scales + torch.log(values.abs())).reshape(-1)
    lowest = torch.full((1,), float("-inf"), dtype=magnitudes.dtype, device=magnitudes.device)
    return log_scale_of(torch.cat([magnitudes, lowest]).amax())  # the appended −inf: N = 0 gives 0


def scaled_sum(values: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Σ values·e^log_scales (``[N]`` each; the scales detached), differentiable in ``values``.

    Scaled down by a common e^S first, summed, then scaled back: a sum that fits fp32 comes out finite
    even when one of its terms does not (a token's loss of 4e38 weighed by 1/2), one beyond fp32 is ±inf,
    never inf − inf. With every scale 0 (nothing above e^SCALE_FROM) it is ``values.sum()``, bit for bit.
    """
    shift = _common_scale(values.detach(), log_scales)
    return (values * torch.exp(log_scales - shift)).sum() * torch.exp(shift)


def _as_denominator(value, like: torch.Tensor):
    """A caller's global count (a number, or a one-element tensor floored at 1) as a divisor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(()).clamp_min(1.0)
    return float(value)


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
"""Always reported; with a rollout correction also ``rollout_weight_mean``, ``rollout_weight_max``
and ``rollout_weight_masked``."""


class MetricInputs(NamedTuple):
    """Per-token values the metrics are computed from, ``[N]`` each (detached)."""

    pg: torch.Tensor  # w·pg · e^−log_scale
    kl: torch.Tensor  # · e^−kl_log_scale
    entropy: torch.Tensor
    ratio: torch.Tensor  # the ratio the variant uses (s_b for gspo)
    ratio_log: torch.Tensor  # its logarithm
    token_ratio: torch.Tensor  # r_t = exp(lp − old), after log_ratio_clamp
    log_ratio: torch.Tensor  # lp − old, after log_ratio_clamp
    clipped: torch.Tensor  # bool
    dual: torch.Tensor  # bool
    rollout_weight: Optional[torch.Tensor]
    log_scale: torch.Tensor  # of pg
    kl_log_scale: torch.Tensor  # of kl


@torch.no_grad()
def loss_metrics(valid: torch.Tensor, x: MetricInputs, clip_low: float, clip_high: float) -> Dict[str, torch.Tensor]:
    """The metrics of the contract: token means over valid tokens; 0 with no valid token, no host sync.

    fp64 inputs (the ground truth of the accuracy tests) keep fp64 metrics; everything else is fp32.
    """
    dtype = torch.float64 if x.ratio.dtype == torch.float64 else torch.float32
    v = valid.reshape(-1)
    count = v.sum()
    denom = count.clamp_min(1).to(dtype)

    def mean(t: torch.Tensor, log_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mean of t·e^log_scale over valid tokens: finite when it fits fp32, even where a term does not."""
        t = t.reshape(-1).to(dtype)
        t = torch.where(v, t, torch.zeros_like(t))
        if log_scale is None:
            return t.sum() / denom
        log_scale = torch.where(v, log_scale.reshape(-1).to(dtype), torch.zeros_like(t))
        shift = _common_scale(t, log_scale)
        return (t * torch.exp(log_scale - shift)).sum() / denom * torch.exp(shift)

    def exponential(log_value: torch.Tensor, value: torch.Tensor, minus: Optional[torch.Tensor] = None):
        """(e^x − minus, as t·e^s): ``value`` (e^x computed as given, minus subtracted) where x ≤ SCALE_FROM,
        e^(x − s) − minus·e^−s beyond, s its log scale."""
        log_value = log_value.reshape(-1).to(dtype)
        scale = log_scale_of(log_value)
        scaled = torch.exp(log_value - scale)
        if minus is not None:
            scaled = scaled - minus.reshape(-1).to(dtype) * torch.exp(-scale)
        return torch.where(scale > 0, scaled, value.reshape(-1).to(dtype)), scale

    def fraction(flag: torch.Tensor) -> torch.Tensor:
        return mean(flag.to(dtype))

    def extreme(t: torch.Tensor, largest: bool) -> torch.Tensor:
        # the appended ±inf keeps the reduction defined when there are no tokens at all (N = 0)
        t = t.reshape(-1).to(dtype)
        fill = torch.full((), float("-inf") if largest else float("inf"), dtype=dtype, device=t.device)
        padded = torch.cat([torch.where(v, t, fill), fill.view(1)])
        return torch.where(count > 0, padded.amax() if largest else padded.amin(), torch.zeros_like(fill))

    r = x.ratio.reshape(-1).to(dtype)
    log_r = x.log_ratio.reshape(-1).to(dtype)
    # (r − 1) − log r, and the ratio itself, beyond fp32 as t·e^s: their means may still fit
    approx_kl = exponential(log_r, (x.token_ratio.reshape(-1).to(dtype) - 1.0) - log_r, 1.0 + log_r)
    metrics = {
        "pg_loss": mean(x.pg, x.log_scale),
        "kl": mean(x.kl, x.kl_log_scale),
        "entropy": mean(x.entropy),
        "clipfrac": fraction(x.clipped),
        "clipfrac_lower": fraction(x.dual),
        "ratio_mean": mean(*exponential(x.ratio_log, r)),
        "ratio_min": extreme(r, largest=False),
        "ratio_max": extreme(r, largest=True),
        "ratio_above": fraction(r > clip_high),
        "ratio_below": fraction(r < clip_low),
        "approx_kl": mean(*approx_kl),
    }
    if x.rollout_weight is not None:
        metrics["rollout_weight_mean"] = mean(x.rollout_weight)
        metrics["rollout_weight_max"] = extreme(x.rollout_weight, largest=True)
        metrics["rollout_weight_masked"] = fraction(x.rollout_weight == 0)
    return metrics


def output(
    loss: torch.Tensor,
    logprobs: torch.Tensor,  # [N]
    entropy: torch.Tensor,  # [N]
    valid: torch.Tensor,  # [N] bool
    shape: torch.Size,  # leading shape of the targets
    metrics: Dict[str, torch.Tensor],
) -> PPOLossOutput:
    """The returned value: fp32 (fp64 stays fp64) per-token outputs, detached, 0 where masked."""
    logprobs, entropy = logprobs.detach(), entropy.detach()
    if logprobs.dtype != torch.float64:
        logprobs, entropy = logprobs.float(), entropy.float()
    zeros = torch.zeros_like(logprobs)
    lp_out = torch.where(valid, logprobs, zeros).view(shape)
    entropy_out = torch.where(valid, entropy, zeros).view(shape)
    if loss.dtype != torch.float64:
        loss = loss.to(torch.float32)
    return PPOLossOutput(loss, lp_out, entropy_out, metrics)
