"""The gradient of a row inside the kernels: the coefficients of (1/τ)·[c_lp·(1[j = y] − p_j) +
c_H·p_j·(log p_j + H)], the entries written from them, and the target's own entry."""

from __future__ import annotations

import triton
import triton.language as tl

from .streaming import _FLT_MAX, _INTERPRETED, _LOG2E, _Z_FLOOR, _scaled

# The shift of a row whose coefficient is infinite (_coefficients): e^88 times the smallest normal fp32
# number is 1.9, so e^88·p·FLT_MAX overflows for every normal p > 0.
_INF_SHIFT = tl.constexpr(88.0)


@triton.jit
def _to_output(
    grad,  # fp32 values
    out_dtype: tl.constexpr,  # element type of the output
):
    """grad rounded to nearest (ties to even) in out_dtype."""
    if out_dtype == tl.bfloat16 and _INTERPRETED:
        # The interpreter's bf16 cast truncates (and mishandles denormals): round the fp32
        # bits at bit 16, ties to even, and keep the upper half; NaN stays a quiet NaN.
        bits = grad.to(tl.uint32, bitcast=True)
        upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        upper = tl.where(grad == grad, upper, 0x7FC0)
        return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return grad.to(out_dtype)


@triton.jit
def _store_grad_chunk(
    grad_ptr,  # where the chunk's gradient starts
    raw,  # [LANES, VEC] raw logits of the chunk, still in registers
    cols,  # [LANES, VEC] int32 column in the chunk
    n,  # columns of the chunk inside the row (≤ 0: none)
    key,  # int32 run-time 0 (_reconverted)
    ref,  # row max, clamped to ≥ −FLT_MAX
    log_sum,  # log s
    coef_z,  # c_H / τ
    coef_const,  # (c_H·H − c_lp) / τ
    shift,  # s: the coefficients are times e^−s, finite
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    SCALED: tl.constexpr,  # τ ≠ 1
):
    """The gradient of a chunk without the target's one-hot term."""
    x = _scaled(_reconverted(raw, key), temperature, inv_temperature, SCALED)
    grad = _grad_terms(x, ref, log_sum, coef_z, coef_const, shift)[0]
    tl.store(grad_ptr + cols, _to_output(grad, grad_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def _reconverted(
    raw,  # bf16 or fp32 logits of a row held in registers
    key,  # int32 run-time 0
):
    """raw in fp32 again. bf16 moves its bits (exact) with a run-time zero OR-ed in, which
    the compiler cannot merge with the first pass's conversion: merged, the fp32 copy of the
    row would stay live between the passes and spill. fp32 needs no conversion."""
    if raw.dtype == tl.bfloat16:
        return ((raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16) | key).to(tl.float32, bitcast=True)
    return raw.to(tl.float32)


@triton.jit
def _grad_terms(
    x,  # scaled logits
    ref,  # row max of x, clamped to ≥ −FLT_MAX
    log_sum,  # log s
    coef_z,  # c_H / τ (times e^−shift)
    coef_const,  # (c_H·H − c_lp) / τ (times e^−shift)
    shift,  # ln of the factor the finite coefficients leave out (_coefficients; s in the gradient in forward)
):
    """((1/τ)·[−c_lp·p_j + c_H·p_j·(log p_j + H)] = e^shift·p_j·(coef_z·log p_j + coef_const), e^shift·p_j):
    the gradient without the target's one-hot term c_lp / τ.

    e^shift·p_j is one exp2 (of log p_j·log2 e + shift·log2 e, an fma): no multiply per logit. log p is
    clamped at −128 − shift (e^shift·p = 0 there), so a banned token gives 0·finite = 0, never 0·inf
    (the coefficients are finite); the clamp propagates NaN.
    """
    log_p = (x - ref) - log_sum
    log_p = tl.maximum(log_p, tl.zeros_like(log_p) + (_Z_FLOOR - shift), propagate_nan=tl.PropagateNan.ALL)
    p = tl.exp2(log_p * _LOG2E + shift * _LOG2E)
    return p * (coef_z * log_p + coef_const), p


@triton.jit
def _coefficients(
    coef_logprob,  # c_lp = d(loss)/d lp
    coef_entropy,  # c_H
    entropy,  # H
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
):
    """(coef_z, coef_const, coef_onehot, shift, finite) of a row whose gradient is
    e^shift·[p_j·(coef_z·log p_j + coef_const) + 1[j = y]·coef_onehot], the coefficients finite.

    1/τ folds into the coefficients (shift = 0) while they stay finite (``finite``). Otherwise the caller
    writes the target's entry apart (_target_grad) and: a coefficient beyond fp32 only over τ (c_lp near the
    fp32 maximum, τ < 1) leaves 1/τ to shift = ln(1/τ); an infinite one (a term beyond fp32) becomes
    ±FLT_MAX with shift = 88, so that e^88·p·FLT_MAX is ±inf for every normal p > 0 and a p clamped to 0
    gives 0, never 0·inf.
    """
    coef_z = coef_entropy * inv_temperature
    coef_const = (coef_entropy * entropy - coef_logprob) * inv_temperature
    coef_onehot = coef_logprob * inv_temperature
    finite = (tl.abs(coef_z) < float("inf")) & (tl.abs(coef_const) < float("inf"))
    finite = finite & (tl.abs(coef_onehot) < float("inf"))
    raw_const = coef_entropy * entropy - coef_logprob
    infinite = (tl.abs(coef_entropy) == float("inf")) | (tl.abs(raw_const) == float("inf"))
    infinite = infinite | (tl.abs(coef_logprob) == float("inf"))
    shift = tl.where(finite, 0.0, tl.where(infinite, _INF_SHIFT, -tl.log(temperature)))
    coef_z = tl.where(finite, coef_z, _saturated(coef_entropy))
    coef_const = tl.where(finite, coef_const, _saturated(raw_const))
    coef_onehot = tl.where(finite, coef_onehot, _saturated(coef_logprob))
    return coef_z, coef_const, coef_onehot, shift, finite


@triton.jit
def _saturated(
    value,  # fp32
):
    """value with ±inf replaced by ±FLT_MAX (NaN stays NaN)."""
    return tl.where(tl.abs(value) == float("inf"), tl.where(value > 0.0, _FLT_MAX, -_FLT_MAX), value)


@triton.jit
def _target_grad(
    coef_logprob,  # c_lp
    coef_entropy,  # c_H
    entropy,  # H
    p_y,  # the target's probability
    log_p_y,  # its logarithm
    one_minus_p_y,  # 1 − p_y, computed without cancellation by the caller
    post,  # a factor both coefficients leave out (1, or e^s)
    inv_temperature,  # fp32(1 / τ)
):
    """The target's entry (c_lp·(1 − p_y) + c_H·p_y·(log p_y + H))·post / τ, in the reference's form: a zero
    factor gives 0 whatever the coefficient."""
    onehot = tl.where(one_minus_p_y == 0.0, 0.0, coef_logprob * one_minus_p_y)
    ent = tl.where(p_y > 0.0, p_y * (log_p_y + entropy), 0.0)
    return (onehot + coef_entropy * ent) * post * inv_temperature
