"""The per-token math of the plain PPO loss inside the kernels: from a row's lp and H, the ratio, the clipped
surrogate, the KL estimator, the loss and g = dℓ/d lp, with the log scale of a term beyond e^64."""

from __future__ import annotations

import triton
import triton.language as tl

# An exponential of the per-token math above e^64 is computed as e^(x − s) and carried with its log
# scale s ≤ 87 (SCALE_FROM and SCALE_MAX of rlhf_fast/backends/rows.py, which say why; a test checks
# that the numbers agree).
_SCALE_FROM = tl.constexpr(64.0)
_SCALE_MAX = tl.constexpr(87.0)


@triton.jit
def _log_scale(
    exponent,  # x of an exponential e^x
):
    """Its log scale s: x − SCALE_FROM capped at SCALE_MAX above SCALE_FROM, else 0 (NaN: 0)."""
    return tl.where(exponent > _SCALE_FROM, tl.minimum(exponent - _SCALE_FROM, _SCALE_MAX), 0.0)


@triton.jit
def _store_token_loss(
    row, lp, entropy,
    advantages_ptr, old_logprobs_ptr, ref_logprobs_ptr, ratio_ptr, pg_ptr, kl_ptr, loss_ptr, dlogp_ptr,
    log_scale_ptr, kl_log_scale_ptr,
    ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
):
    """Row ``row``'s per-token loss from its lp and H, stored: (ratio, pg, kl, loss, dlogp, log_scale,
    kl_log_scale), finite wherever the math is (the arguments named as in the kernels); returns dlogp and
    its log scale.

    NaN in A, old or ref propagates (every min/max here propagates NaN). A ratio that
    overflows (log-ratio > 88) gives the value of the branch that is actually taken: a
    clipped token its clipped value, a zero advantage 0, and both no gradient. β = 0
    adds 0·δ, never 0·inf. pg, loss and dlogp come out times e^−log_scale, kl times
    e^−kl_log_scale: both are 0 (every factor below exactly 1) unless an unclipped ratio, or
    k3's e^δ, exceeds e^SCALE_FROM, so that a token's value beyond fp32 stays finite until
    the caller has weighed it.
    """
    old = tl.load(old_logprobs_ptr + row) if HAS_OLD else 0.0  # old log-prob
    ref_lp = tl.load(ref_logprobs_ptr + row) if HAS_REF else 0.0  # reference log-prob
    adv = tl.load(advantages_ptr + row)  # A
    zero = tl.zeros([], tl.float32)
    if HAS_OLD:
        log_ratio = lp - old
        ratio = tl.exp(log_ratio)
    else:
        log_ratio = zero
        ratio = tl.full([], 1.0, tl.float32) + 0.0 * lp
    inactive = ((adv > 0.0) & (ratio > ratio_high)) | ((adv < 0.0) & (ratio < ratio_low))
    if HAS_DUAL_CLIP:
        inactive = inactive | ((adv < 0.0) & (ratio > dual_clip))
    # A = 0 has no gradient even when r overflows (0·inf); NaN in r or A still propagates.
    no_grad = inactive | ((adv == 0.0) & (ratio == ratio))
    delta = zero
    kl_scale = zero
    scale = tl.where(no_grad, 0.0, _log_scale(log_ratio))
    if HAS_REF:
        delta = ref_lp - lp
        if KL_ESTIMATOR >= 2:  # k3, k3+: e^δ
            kl_scale = _log_scale(delta)
            scale = tl.where(kl_coef != 0.0, tl.maximum(scale, kl_scale), scale)
    unit = tl.exp(-scale)  # 1 when the scale is 0
    if HAS_OLD:
        ratio_s = tl.exp(log_ratio - scale)
    else:
        ratio_s = ratio * unit
    # pg = max(−A·r, −A·clip(r)) = −A·q with q = min(r, 1+ε) for A ≥ 0, max(r, 1−ε) for A < 0,
    # and min(q, c) under the dual clip: q is finite whenever −A·q is.
    q_pos = tl.minimum(ratio_s, ratio_high * unit, propagate_nan=tl.PropagateNan.ALL)
    q_neg = tl.maximum(ratio_s, ratio_low * unit, propagate_nan=tl.PropagateNan.ALL)
    if HAS_DUAL_CLIP:
        q_neg = tl.minimum(q_neg, dual_clip * unit, propagate_nan=tl.PropagateNan.ALL)
    pg = -adv * tl.where(adv >= 0.0, q_pos, q_neg)
    dlogp = tl.where(no_grad, 0.0, -adv * ratio_s)
    kl = zero
    kl_term = kl
    if HAS_REF:
        if KL_ESTIMATOR >= 2:
            kl_unit = tl.exp(-kl_scale)
            kl_to_loss = tl.exp(kl_scale - scale)
        else:  # k1, k2: no exponential, no scale of their own
            kl_unit = 1.0
            kl_to_loss = unit
        if KL_ESTIMATOR == 0:
            kl = -delta * kl_unit
            kl_grad = kl_unit
        elif KL_ESTIMATOR == 1:
            kl = 0.5 * delta * delta * kl_unit
            kl_grad = -delta * kl_unit
        else:
            exp_delta = tl.exp(delta - kl_scale)
            kl = exp_delta - delta * kl_unit - kl_unit
            if KL_ESTIMATOR == 2:
                kl_grad = kl_unit - exp_delta
            else:  # k3+: value of k3, gradient of k2
                kl_grad = -delta * kl_unit
        # β = 0: the KL is a metric only; 0·δ keeps a NaN ref visible, never 0·inf.
        kl_term = tl.where(kl_coef != 0.0, kl_coef * kl * kl_to_loss, 0.0 * delta)
        dlogp += tl.where(kl_coef != 0.0, kl_coef * kl_grad * kl_to_loss, 0.0 * delta)
    loss = pg + kl_term - entropy_coef * entropy * unit
    tl.store(ratio_ptr + row, ratio)
    tl.store(pg_ptr + row, pg)
    tl.store(kl_ptr + row, kl)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogp_ptr + row, dlogp)
    tl.store(log_scale_ptr + row, scale)
    tl.store(kl_log_scale_ptr + row, kl_scale)
    return dlogp, scale
