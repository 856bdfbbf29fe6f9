"""The per-token loss every loss call runs through, from each token's log-prob and entropy.

* :func:`token_math` — the per-token half of a row backend's forward for the plain PPO loss: from
  each row's :class:`~rlhf_fast.backends.rows.RowStats` (lp, H, m and log s), the
  :class:`~rlhf_fast.backends.rows.TokenResults` a fused forward returns (ratio, pg, kl, ℓ and g = dℓ/d lp).
  The closed-form reference's forward and the vocabulary-parallel forward of every backend use it.
* :func:`weighted_token_loss`, :func:`finish_token_loss` — any variant or correction on differentiable
  lp and H ``[N]`` (:func:`~.policy.token_terms`), weighted and summed, with the metrics and the masked
  outputs: the eager reference, the fused statistics paths and each chunk of the fused-linear loss.
* :func:`fused_output` — the metrics and outputs of the one-pass fused PPO loss's per-token results.
* :func:`logprobs_ppo_loss` — the public form: the loss of per-token log-probs and entropies that the
  caller computed (``rf.logprobs``, ``rf.fused_linear_logprobs``), with the checks of ``rf.ppo_loss``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends.rows import RowParams, RowStats, TokenResults
from .aggregation import MetricInputs, PPOLossOutput, loss_metrics, output, scaled_sum
from .inputs import LossInputs, bind, check_tensor, loss_entry, prepare
from .options import KL_ESTIMATORS, LossOptions
from .policy import Sequences, token_terms
from .policy import clip_flags as policy_clip_flags


def plain_options(params: RowParams) -> LossOptions:
    """The loss options of a row backend's parameters (the plain PPO loss)."""
    return LossOptions(
        clip_eps=params.clip_eps_low, clip_eps_high=params.clip_eps_high,
        dual_clip=params.dual_clip if params.has_dual_clip else None, kl_coef=params.kl_coef,
        kl_estimator=KL_ESTIMATORS[params.kl_estimator], entropy_coef=params.entropy_coef,
        temperature=params.temperature,
    )


def clip_flags(ratio: torch.Tensor, advantages: torch.Tensor, params: RowParams):
    """(clipped, dual) per token for a row backend's parameters (see :func:`.policy.clip_flags`)."""
    return policy_clip_flags(ratio, advantages, 1.0 - params.clip_eps_low, 1.0 + params.clip_eps_high,
                             params.dual_clip if params.has_dual_clip else None)


def surrogate_active(ratio: torch.Tensor, advantages: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Where the unclipped branch −A·r carries the gradient (a zero advantage carries none)."""
    clipped, dual = clip_flags(ratio, advantages, params)
    return ~(clipped | dual) & (advantages != 0)


def kl_grad(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int,
            log_scale: torch.Tensor) -> torch.Tensor:
    """d kl / d lp for each estimator, times e^−log_scale (k3's e^δ as e^(δ − s))."""
    unit = torch.exp(-log_scale)
    if estimator == 0:
        return unit
    if estimator == 2:
        return unit - torch.exp((ref_logprobs - logprobs) - log_scale)
    return (logprobs - ref_logprobs) * unit  # k2 and k3+


@torch.no_grad()
def token_math(
    stats: RowStats,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    params: RowParams,
) -> TokenResults:
    """The per-token part of the forward, from each row's statistics (lp, H, m, log s ``[N]``, and the
    probability outside a vocabulary shard, which the results carry on)."""
    logprobs, entropy = stats.logprobs, stats.entropy
    valid = torch.ones_like(logprobs, dtype=torch.bool)
    terms = token_terms(logprobs, entropy, advantages, old_logprobs if params.has_old else None,
                        ref_logprobs if params.has_ref else None, None, valid, None, plain_options(params))
    ratio, scale = terms.token_ratio, terms.log_scale
    active = surrogate_active(ratio, advantages, params)
    exponent = torch.where(active, terms.log_ratio, torch.zeros_like(ratio))
    dlogp = torch.where(active, -advantages * torch.exp(exponent - scale), 0.0)  # −A·r, · e^−s as the loss
    dlogp = dlogp + torch.where(torch.isnan(terms.log_ratio), terms.log_ratio, 0.0)  # NaN in old reaches g
    if params.has_ref and params.kl_coef != 0.0:
        grad = kl_grad(logprobs, ref_logprobs, params.kl_estimator, terms.kl_log_scale)
        dlogp = dlogp + params.kl_coef * grad * torch.exp(terms.kl_log_scale - scale)
    return TokenResults(logprobs, entropy, stats.row_max, stats.log_sum, ratio, terms.pg, terms.kl, terms.loss, dlogp,
                        scale, terms.kl_log_scale, stats.outside)


def weighted_token_loss(logprobs: torch.Tensor, entropy: torch.Tensor, x: LossInputs, rows: slice = slice(None),
                        sequences: Optional[Sequences] = None):
    """(lp, H with masked rows zeroed, their :class:`~.policy.TokenTerms`, Σ w·ℓ) for the rows ``rows`` of ``x``,
    from their differentiable lp and H; ``sequences``: those of these rows (``x.sequences`` for all rows)."""
    valid = x.valid[rows]
    zeros = torch.zeros_like(logprobs)
    # A masked row's placeholder target may be a banned (−inf) token: zero lp and H there
    # so nothing downstream (exp(ref − lp) in k3) turns it into a NaN gradient.
    logprobs, entropy = torch.where(valid, logprobs, zeros), torch.where(valid, entropy, zeros)
    part = lambda t: None if t is None else t[rows]  # noqa: E731
    terms = token_terms(logprobs, entropy, x.advantages[rows], part(x.old_logprobs), part(x.ref_logprobs),
                        part(x.rollout_logprobs), valid, sequences, x.options)
    token_loss = torch.where(valid, terms.loss, torch.zeros_like(terms.loss))
    scale = torch.where(valid, terms.log_scale, torch.zeros_like(terms.log_scale))
    return logprobs, entropy, terms, scaled_sum(x.weights[rows].to(token_loss.dtype) * token_loss, scale)


def finish_token_loss(logprobs: torch.Tensor, entropy: torch.Tensor, x: LossInputs) -> PPOLossOutput:
    """The loss, outputs and metrics from each row's differentiable lp and H ``[N]`` (eager or fused stats)."""
    logprobs, entropy, terms, loss = weighted_token_loss(logprobs, entropy, x, sequences=x.sequences)
    metrics = loss_metrics(x.valid, MetricInputs(
        terms.pg.detach(), terms.kl.detach(), entropy.detach(), terms.ratio, terms.ratio_log, terms.token_ratio,
        terms.log_ratio, terms.clipped, terms.dual, terms.rollout_weight, terms.log_scale, terms.kl_log_scale),
        1.0 - x.options.clip_eps, 1.0 + x.options.clip_high)
    return output(loss, logprobs, entropy, x.valid, x.shape, metrics)


def fused_output(loss, logprobs, entropy, ratio, pg, kl, log_scale, kl_log_scale, x: LossInputs) -> PPOLossOutput:
    """Metrics and outputs of the one-pass fused PPO loss's per-token results ``[N]`` (pg · e^−log_scale,
    kl · e^−kl_log_scale)."""
    log_ratio = logprobs - x.old_logprobs if x.old_logprobs is not None else torch.zeros_like(logprobs)
    clipped, dual = clip_flags(ratio, x.advantages, x.params)
    metrics = loss_metrics(x.valid, MetricInputs(pg, kl, entropy, ratio, log_ratio, ratio, log_ratio, clipped, dual,
                                                 None, log_scale, kl_log_scale),
                           1.0 - x.params.clip_eps_low, 1.0 + x.params.clip_eps_high)
    return output(loss, logprobs, entropy, x.valid, x.shape, metrics)


@loss_entry
def logprobs_ppo_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    *tensors: torch.Tensor,
    vocab_size: int,
    **keywords,
) -> PPOLossOutput:
    """The loss of per-token log-probs and entropies ``[...]`` that are already computed, e.g. differentiable
    ones from ``rf.fused_linear_logprobs(..., with_entropy=True)`` or ``rf.logprobs``.

    The same input checks, per-token math, aggregation, outputs and metrics as :func:`rlhf_fast.ppo_loss` on
    the logits they come from (``vocab_size``: those logits' vocabulary, for the target range), so a caller
    that needs the log-probs for something else too pays for one statistics pass. Gradients flow to
    ``logprobs`` and ``entropy``; the other arguments and the loss options are those of ``rf.ppo_loss``.
    """
    args = bind("logprobs_ppo_loss", tensors, keywords)
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        got = logprobs.dtype if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__
        raise ValueError(f"logprobs must be a floating-point torch.Tensor, got {got}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be an int > 0 (the vocabulary of the logits the log-probs come from), "
                         f"got {vocab_size!r}")
    check_tensor("entropy", entropy, logprobs.device, "logprobs")
    if entropy.shape != logprobs.shape:
        raise ValueError(f"entropy shape {tuple(entropy.shape)} must match logprobs shape {tuple(logprobs.shape)}")
    x = prepare(logprobs.shape, vocab_size, logprobs.device, logprobs.dtype, args, other="logprobs")
    return finish_token_loss(logprobs.reshape(-1), entropy.reshape(-1), x)
