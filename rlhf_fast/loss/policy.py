"""The per-token math of every policy-loss variant and correction, written once on ``[N]`` tensors.

:func:`token_terms` turns each token's log-prob lp and entropy H (differentiable, from the
eager reference or from a fused backend's :class:`~rlhf_fast.loss.autograd.RowLogprobs`) and
the constants (advantages, old / reference / rollout log-probs) into the per-token loss
ℓ_t = w_t·pg_t + β·kl_t − η·H_t and the quantities the metrics report. Autograd differentiates
it; a fused backend's backward then turns d(loss)/d lp and d(loss)/dH into d(logits).

Numerics (docs/contract.md): finite wherever the math is finite. A clipped or zero-advantage
token takes no gradient through an overflowing ratio (the exponent is masked *before* exp, so
autograd never forms 0·inf); a zero rollout weight or a zero coefficient never multiplies an
infinite term; NaN in an input that enters the loss reaches the loss. An exponential above
e^64 (an unclipped ratio, k3's e^δ) is computed as e^(x − s) with a per-token ``log_scale`` s
(:data:`~rlhf_fast.backends.rows.SCALE_FROM`): the loss, pg and kl come out times e^−s, so a
token's term stays finite until the aggregation has weighed it (a value of 4e38 weighed by 1/2).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..backends.rows import SCALE_MAX, log_scale_of
from ..registry import Registry


class Sequences(NamedTuple):
    """Which tokens form a sequence: ``[B, T]`` rows, or packed with ``cu_seqlens``."""

    index: Tensor  # [N] long: the sequence of each token
    count: int  # S, the number of sequences

    def sum(self, x: Tensor) -> Tensor:
        """Σ over each sequence's tokens ``[S]`` (differentiable in x)."""
        return torch.zeros(self.count, dtype=x.dtype, device=x.device).index_add(0, self.index, x)

    def expand(self, per_sequence: Tensor) -> Tensor:
        """One value per sequence ``[S]`` → one per token ``[N]``."""
        return per_sequence[self.index]


class PolicyTerm(NamedTuple):
    """A variant's per-token policy term and what the metrics report about it, ``[N]`` each."""

    pg: Tensor  # the policy term (differentiable in lp) · e^−log_scale
    ratio: Tensor  # the ratio the variant uses (s_b for gspo), detached: ratio_* metrics
    ratio_log: Tensor  # its logarithm, detached (the ratio_mean of ratios beyond fp32)
    clipped: Tensor  # bool: the term is clipped (clipfrac)
    dual: Tensor  # bool: the dual clip is active (clipfrac_lower)
    log_scale: Tensor  # s of pg (0 unless an unclipped ratio exceeds e^SCALE_FROM), detached


class PolicyLoss(NamedTuple):
    """A registered policy-loss variant and its properties (the rest of the package reads these, never names)."""

    compute: Callable  # (lp, log_ratio, raw_log_ratio, advantages, valid, sequences, options) -> PolicyTerm
    takes_dual_clip: bool  # dual_clip applies to it
    needs_sequences: bool  # its term of a token reads the other tokens of its sequence
    description: str
    row_kernels: bool = False  # the fused backends' one-pass PPO kernels compute it (else: their statistics pass)


POLICY_LOSSES = Registry("policy loss")
"""Policy-loss variants by name (``policy_loss=``)."""


def policy_loss(name: str, description: str, *, takes_dual_clip: bool = False, needs_sequences: bool = False,
                row_kernels: bool = False) -> Callable:
    """Register the decorated per-token function as the policy loss ``name``, with its properties."""

    def register(compute: Callable) -> Callable:
        POLICY_LOSSES.register(name, PolicyLoss(compute, takes_dual_clip, needs_sequences, description, row_kernels))
        return compute

    return register


class TokenTerms(NamedTuple):
    """Everything :func:`token_terms` computes, ``[N]`` each."""

    loss: Tensor  # ℓ = w·pg + β·kl − η·H (differentiable) · e^−log_scale
    pg: Tensor  # w·pg (differentiable) · e^−log_scale
    kl: Tensor  # the KL term (after clamp and ratio weighting), differentiable, · e^−kl_log_scale
    ratio: Tensor  # the ratio the variant uses, detached
    ratio_log: Tensor  # its logarithm, detached
    token_ratio: Tensor  # r_t = exp(lp − old) after log_ratio_clamp, detached
    log_ratio: Tensor  # the token log-ratio lp − old after log_ratio_clamp, detached (approx_kl)
    clipped: Tensor  # bool
    dual: Tensor  # bool
    rollout_weight: Optional[Tensor]  # w, detached; None without rollout correction
    log_scale: Tensor  # s of loss and pg, detached (SCALE_FROM)
    kl_log_scale: Tensor  # s of kl, detached


# ----------------------------------------------------------------------------------
# The variants
# ----------------------------------------------------------------------------------


def _clip_bounds(options):
    low = 1.0 - options.clip_eps
    high = 1.0 + (options.clip_eps if options.clip_eps_high is None else options.clip_eps_high)
    return low, high


def clip_flags(ratio: Tensor, advantages: Tensor, low: float, high: float, dual_clip: Optional[float]):
    """(clipped, dual) per token: the surrogate is clipped (A > 0 and r > high, or A < 0 and r < low; the
    clipfrac metric), and the dual clip is active (A < 0 and r > c; clipfrac_lower)."""
    clipped = ((advantages > 0) & (ratio > high)) | ((advantages < 0) & (ratio < low))
    dual = (advantages < 0) & (ratio > dual_clip) if dual_clip is not None else torch.zeros_like(clipped)
    return clipped, dual


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, options) -> PolicyTerm:
    """pg = max(−A·r, −A·clamp(r, 1 − ε_low, 1 + ε_high)) (and the dual clip), r = exp(log_ratio).

    Written as −A·r where the unclipped branch is active and −A·bound elsewhere: the same
    value, but a clipped or zero-advantage token takes no gradient and never forms 0·inf,
    however large r is. An active r above e^SCALE_FROM is e^(log r − s), s its ``log_scale``.
    """
    low, high = _clip_bounds(options)
    ratio_log = log_ratio.detach()
    ratio = torch.exp(ratio_log)
    clipped, dual = clip_flags(ratio, advantages, low, high, options.dual_clip)
    active = ~(clipped | dual) & (advantages != 0)
    exponent = torch.where(active, log_ratio, torch.zeros_like(log_ratio))
    scale = log_scale_of(exponent.detach())  # 0 where clipped: the bounds need no scale
    unclipped = torch.exp(exponent - scale)
    bound = torch.where(advantages > 0, _full(log_ratio, high), _full(log_ratio, low))
    if options.dual_clip is not None:
        bound = torch.where(dual, _full(log_ratio, options.dual_clip), bound)
    pg = -advantages * torch.where(active, unclipped, bound)
    return PolicyTerm(_nan_from(log_ratio, pg), ratio, ratio_log, clipped, dual, scale)


def _full(like: Tensor, value: float) -> Tensor:
    """``value`` as a 0-d tensor in ``like``'s dtype (fp64 stays exact; fp32 rounds once, as the kernels)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _nan_from(source: Tensor, value: Tensor) -> Tensor:
    """``value`` with the NaNs of ``source`` (a zero advantage must not hide a NaN input)."""
    return value + torch.where(torch.isnan(source), source, torch.zeros_like(source))


@policy_loss("ppo", "the clipped surrogate (asymmetric clip, dual clip)", takes_dual_clip=True, row_kernels=True)
def _ppo(lp, log_ratio, raw_log_ratio, advantages, valid, sequences, options) -> PolicyTerm:
    return clipped_surrogate(log_ratio, advantages, options)


@policy_loss("gspo", "GSPO: the clipped surrogate of the sequence ratio", takes_dual_clip=True,
             needs_sequences=True)
def _gspo(lp, log_ratio, raw_log_ratio, advantages, valid, sequences, options) -> PolicyTerm:
    """The token form of GSPO: ρ_t = sg(s_b)·exp(lp_t − sg(lp_t)), s_b = exp(mean of the raw log-ratios of b)."""
    raw = torch.where(valid, raw_log_ratio.detach(), torch.zeros_like(raw_log_ratio))
    tokens = sequences.sum(valid.to(raw.dtype))
    log_s = sequences.sum(raw) / tokens.clamp_min(1.0)  # a sequence without a valid token: s_b = 1
    through = lp - lp.detach()  # value 0, gradient 1 w.r.t. lp_t
    if options.log_ratio_clamp is not None:  # a clamped sequence ratio is a constant: no gradient
        c = options.log_ratio_clamp
        through = torch.where(sequences.expand((log_s >= -c) & (log_s <= c)), through, torch.zeros_like(through))
        log_s = log_s.clamp(-c, c)
    return clipped_surrogate(sequences.expand(log_s) + through, advantages, options)


@policy_loss("cispo", "CISPO: clipped importance weight times A·lp")
def _cispo(lp, log_ratio, raw_log_ratio, advantages, valid, sequences, options) -> PolicyTerm:
    """CISPO (MiniMax-M1): −sg(clamp(r, 1 − ε_low, 1 + ε_high))·A·lp."""
    low, high = _clip_bounds(options)
    ratio = torch.exp(log_ratio.detach())
    weight = ratio.clamp(low, high)
    clipped = (ratio < low) | (ratio > high)
    return PolicyTerm(-weight * advantages * lp, ratio, log_ratio.detach(), clipped, torch.zeros_like(clipped),
                      torch.zeros_like(ratio))


@policy_loss("sapo", "SAPO: a soft sigmoid gate on the ratio")
def _sapo(lp, log_ratio, raw_log_ratio, advantages, valid, sequences, options) -> PolicyTerm:
    """SAPO's soft gate: −(4/κ)·σ(κ·(r − 1))·A, κ = sapo_tau_pos (A > 0) or sapo_tau_neg."""
    kappa = torch.where(advantages > 0, _full(lp, options.sapo_tau_pos), _full(lp, options.sapo_tau_neg))
    # σ(κ(r − 1)) is 1 in fp32 beyond κ(r − 1) = 40 (its gradient ~1e-16): cap the exponent there,
    # so r never overflows and a saturated gate takes no gradient instead of 0·inf.
    cap = math.log1p(40.0 / min(options.sapo_tau_pos, options.sapo_tau_neg))
    gate = torch.sigmoid(kappa * (torch.exp(log_ratio.clamp(max=cap)) - 1.0))
    pg = -(4.0 / kappa) * gate * advantages
    ratio = torch.exp(log_ratio.detach())
    no_clip = torch.zeros_like(advantages, dtype=torch.bool)
    return PolicyTerm(_nan_from(log_ratio, pg), ratio, log_ratio.detach(), no_clip, no_clip, torch.zeros_like(ratio))


# ----------------------------------------------------------------------------------
# KL, rollout correction, the per-token loss
# ----------------------------------------------------------------------------------

_KL_NAMES = ("k1", "k2", "k3", "k3+")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: int, log_scale: Optional[Tensor] = None) -> Tensor:
    """KL estimator from δ = ref − lp (index into k1, k2, k3, k3+); differentiable in ``logprobs``.

    With ``log_scale`` s (detached): the estimator times e^−s, k3's e^δ computed as e^(δ − s).
    """
    delta = ref_logprobs - logprobs
    scale = torch.zeros_like(delta) if log_scale is None else log_scale
    unit = torch.exp(-scale)  # 1 when s = 0: the plain estimators, bit for bit
    k2 = 0.5 * delta * delta * unit
    if estimator == 0:  # k1
        return -delta * unit
    if estimator == 1:  # k2
        return k2
    k3 = torch.exp(delta - scale) - delta * unit - unit
    if estimator == 2:  # k3
        return k3
    return k2 + (k3 - k2).detach()  # k3+: value of k3, gradient of k2


def kl_term(logprobs: Tensor, ref_logprobs: Tensor, options) -> Tuple[Tensor, Tensor]:
    """(the KL estimator · e^−s, s), clamped to [−c, c] with ``kl_clamp`` (no gradient where clamped; k3+ keeps
    k2's). s > 0 only for an unclamped k3 or k3+ whose e^δ exceeds e^SCALE_FROM."""
    estimator = _KL_NAMES.index(options.kl_estimator)
    no_scale = torch.zeros_like(logprobs.detach())
    if options.kl_clamp is None:
        scale = log_scale_of((ref_logprobs - logprobs).detach()) if estimator >= 2 else no_scale
        return kl_estimate(logprobs, ref_logprobs, estimator, scale), scale
    c = options.kl_clamp
    value = kl_estimate(logprobs.detach(), ref_logprobs, estimator)
    if estimator == 3:  # k3+: value of the clamped k3, gradient of the unclamped k2
        k2 = kl_estimate(logprobs, ref_logprobs, 1)
        return k2 + (value.clamp(-c, c) - k2).detach(), no_scale
    clamped = (value > c) | (value < -c)
    # where clamped, the estimator sees a constant δ = 0: no gradient, and no inf to multiply by 0
    inside = torch.where(clamped, ref_logprobs, logprobs)
    return torch.where(clamped, value.clamp(-c, c), kl_estimate(inside, ref_logprobs, estimator)), no_scale


def rollout_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, valid: Tensor,
                    sequences: Optional[Sequences], options) -> Tensor:
    """The rollout importance weight w ``[N]`` (no gradient): truncated or masked ρ, per token or sequence."""
    log_rho = torch.where(valid, old_logprobs.detach() - rollout_logprobs, torch.zeros_like(rollout_logprobs))
    if options.rollout_is_level == "sequence":
        log_rho = sequences.expand(sequences.sum(log_rho).clamp(-20.0, 20.0))
    rho = torch.exp(log_rho)
    low, high = options.rollout_is_min, options.rollout_is_max
    if options.rollout_is == "truncate":
        return rho.clamp(low, high)
    inside = torch.ones_like(valid)
    if low is not None:
        inside = inside & (rho >= low)
    if high is not None:
        inside = inside & (rho <= high)
    return torch.where(inside | torch.isnan(rho), rho, torch.zeros_like(rho))


def token_terms(
    logprobs: Tensor,  # [N] lp, differentiable
    entropy: Tensor,  # [N] H, differentiable
    advantages: Tensor,  # [N]
    old_logprobs: Optional[Tensor],  # [N] or None (on-policy: old = lp detached)
    ref_logprobs: Optional[Tensor],  # [N] or None
    rollout_logprobs: Optional[Tensor],  # [N] or None
    valid: Tensor,  # [N] bool
    sequences: Optional[Sequences],
    options,  # LossOptions
) -> TokenTerms:
    """ℓ_t = w_t·pg_t + β·kl_t − η·H_t per token, with its parts (see the module docstring)."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    raw_log_ratio = logprobs - old
    log_ratio = raw_log_ratio
    if options.log_ratio_clamp is not None:
        log_ratio = raw_log_ratio.clamp(-options.log_ratio_clamp, options.log_ratio_clamp)
    term = POLICY_LOSSES.get(options.policy_loss).compute(
        logprobs, log_ratio, raw_log_ratio, advantages, valid, sequences, options)
    no_scale = torch.zeros_like(term.log_scale)
    kl, kl_scale = torch.zeros_like(logprobs), no_scale
    if ref_logprobs is not None:
        kl, kl_scale = kl_term(logprobs, ref_logprobs, options)
        if options.kl_ratio_weighted:
            ratio_scale = log_scale_of(log_ratio.detach())
            kl, kl_scale = torch.exp(log_ratio - ratio_scale) * kl, kl_scale + ratio_scale
    # One scale per token for the loss: the larger of its terms' (all 0, and every factor below 1, unless an
    # exponential exceeds e^SCALE_FROM).
    scale = term.log_scale
    if options.kl_coef != 0.0 and ref_logprobs is not None:
        scale = torch.maximum(scale, kl_scale).clamp(max=SCALE_MAX)
    weight, pg = None, term.pg * torch.exp(term.log_scale - scale)
    if options.rollout_is != "none":
        weight = rollout_weights(old, rollout_logprobs, valid, sequences, options)
        pg = torch.where(weight == 0, torch.zeros_like(pg), weight * pg)  # a dropped token: 0, even if pg = inf
    # β = 0 adds nothing, not even 0·inf from an overflowing k3, but a NaN KL (a NaN reference) still
    # spreads; η·H is always added: H is finite for finite logits, NaN when a logit is NaN or +inf.
    if options.kl_coef != 0.0:
        loss = pg + options.kl_coef * kl * torch.exp(kl_scale - scale)
    else:
        nan_kl = kl.detach()  # no graph: 0·exp(δ) would be 0·inf in the backward
        loss = pg + torch.where(torch.isnan(nan_kl), nan_kl, torch.zeros_like(nan_kl))
    loss = loss - options.entropy_coef * entropy * torch.exp(-scale)
    # approx_kl reports the token log-ratio the loss uses: after log_ratio_clamp (verl's ppo_kl does the same)
    used = log_ratio.detach()
    return TokenTerms(loss, pg, kl, term.ratio, term.ratio_log, torch.exp(used), used, term.clipped, term.dual,
                      weight, scale, kl_scale)
