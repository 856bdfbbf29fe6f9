"""Triton kernels of the fused PPO loss and their launchers.

The math is the contract's (docs/contract.md, sections "Per-token math", "Gradient" and
"Numerics"). Logits are read as ``[B, T, V]`` with free strides on B and T and stride 1 on
V; row ``i`` of the ``N = B·T`` rows is ``(i // T, i % T)``, so ``logits[:, :-1]`` needs no
copy. x = logits / τ in fp32, equal to a true division. Per row: m = max_j x_j,
s = Σ_j exp(x_j − m), lp = (x_y − m) − log s, p_j = exp((x_j − m) − log s),
H = log s − Σ_j p_j·(x_j − m): the row max is subtracted before anything else.

Kernels:

* ``_ppo_forward_kernel``, ``_logprobs_kernel``: one program per row, one pass over it.
  Each lane (one 16-byte vector slot of a thread) keeps its own running max, Σe and Σe·z,
  so the loop has no reduction across threads; the lanes merge once per row.
* ``_row_partials_kernel`` + ``_combine_kernel``: the same when the rows alone cannot fill
  the GPU: each row's vocabulary is split across programs, then combined per row.
* ``_ppo_backward_kernel``: a grid of (rows, parts of a row), each program a loop over tiles;
  ``_target_fixup_kernel`` then writes the target entries of confident targets (the one-hot
  factor 1 − p_y as Σ_{j≠y} p_j, which the parts of a split row each summed a piece of).
* ``_ppo_forward_grad_kernel`` (opt-in): a row that fits in registers is read once, and
  its d(Σ w·ℓ)/d(logits) is written from the same registers.

Numerics beyond the math above (docs/contract.md, "Numerics"): per-token terms above e^64
are carried with a log scale (``_token_math``); 1 − p_y of a confident target is Σ_{j≠y} p_j;
a coefficient that is not finite over τ is handled by a per-row shift of p (``_coefficients``).

Every row is read as a head (the elements before its first 16-byte boundary), a body of
whole tiles (unmasked 16-byte loads and stores), a tail of whole vectors (masked per
vector, still 16 bytes wide) and the last partial vector; the head and that last vector
(fewer than 2·16/b elements) are read one by one. So any vocabulary (50257, 32001) keeps
vector access.

Bytes model (b = bytes per logit; per-row vectors are O(N) and left out): forward and
logprobs read N·V·b; backward reads N·V·b and writes N·V·b (rows whose two coefficients
are 0 only write zeros); the gradient-in-forward kernel reads N·V·b and writes N·V·b
instead of the 3·N·V·b of forward + backward (and four 16-byte vectors of the target's lane
again per row). No ``[N, V]`` temporary exists.

Specialisation: τ, ε, β, η, c, V, T and the strides are run-time arguments; the feature
switches are old/ref log-probs given, the KL estimator, the dual clip, τ ≠ 1 (the exact
division), vocabulary shards (the probability outside them), and the layout ones (16-byte
vector size, tile size, rows of the gradient in the logits' 16-byte phase).
benchmarks/static_roofline.py compiles every kernel for sm_90 and models its speed on
H100 / H200.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Under TRITON_INTERPRET=1 the kernels run in numpy, whose fma rounds twice and whose
# fp32→bf16 cast truncates; the two helpers that depend on either take the numpy route
# there, with the same results (tests check both routes against the same rounding).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_LOG2E = tl.constexpr(1.4426950408889634)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# exp(z) for z < −128 is 0 in fp32 (below the smallest denormal): such an element adds
# exactly 0 to Σe and Σe·z, and clamping z there keeps e·z = 0·(−inf) out of the sums.
_Z_FLOOR = tl.constexpr(-128.0)
# An exponential of the per-token math above e^64 is computed as e^(x − s) and carried with its log
# scale s ≤ 87 (SCALE_FROM and SCALE_MAX of rlhf_fast/backends/rows.py, which say why; a test checks
# that the numbers agree).
_SCALE_FROM = tl.constexpr(64.0)
_SCALE_MAX = tl.constexpr(87.0)
# The shift of a row whose coefficient is infinite (_coefficients): e^88 times the smallest normal fp32
# number is 1.9, so e^88·p·FLT_MAX overflows for every normal p > 0.
_INF_SHIFT = tl.constexpr(88.0)

# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------


@triton.jit
def _row_offset(
    row,  # row index in [0, N)
    T,  # rows per leading index
    stride_b,  # elements between leading indices
    stride_t,  # elements between rows of one leading index
    ALIGN: tl.constexpr = 1,  # a divisor of every row offset the caller guarantees
):
    # int64: B·T·V exceeds 2^31 at real sizes.
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    return tl.multiple_of(b * stride_b + t * stride_t, ALIGN)


@triton.jit
def _row_head(
    offset,  # int64 offset of the row from the logits base, elements
    V,  # vocabulary size
    VEC: tl.constexpr,  # elements per 16-byte vector
):
    """Elements before the row's first 16-byte boundary (int32; 0 when V·b is a multiple of 16)."""
    return tl.minimum((VEC - offset % VEC) % VEC, V).to(tl.int32)


@triton.jit
def _scaled(
    logits,  # raw logits, any float dtype
    temperature,  # τ (fp32)
    inv_temperature,  # fp32(1 / τ), correctly rounded
    SCALED: tl.constexpr,  # τ ≠ 1
):
    """x = logits / τ in fp32, equal to a correctly rounded division.

    q = l·(1/τ) is within an ulp of l/τ; one fma gives its exact remainder and a second
    rounds the corrected quotient, which is then the correctly rounded l/τ (Markstein's
    theorem; checked for every bf16 value in the tests). Three instructions instead of
    a division's reciprocal and slow path.
    """
    x = logits.to(tl.float32)
    if SCALED:
        if _INTERPRETED:
            x = x / temperature
        else:
            q = x * inv_temperature
            x = tl.fma(tl.fma(-q, temperature, x), inv_temperature, q)
    return x


@triton.jit
def _softmax_step(
    x,  # [LANES, W] fp32 scaled logits, −inf on masked slots
    m,  # [LANES] running max of x per lane (−inf: nothing seen yet)
    ref,  # [LANES] the shift of s and u: max(m, −FLT_MAX)
    s,  # [LANES] running Σ exp(x − ref)
    u,  # [LANES] running Σ exp(x − ref)·(x − ref)
    HAS_ENTROPY: tl.constexpr,  # keep u
):
    """Fold one tile into per-lane softmax statistics: the online-softmax step.

    Each lane rescales only when its own max grows: one exp per lane and one per
    element, no cross-thread reduction. ref is clamped to −FLT_MAX so that an empty lane
    (m = −inf) shifts −inf logits to −inf, never to NaN, and the rescale shift is clamped
    so that a jump of the max from −1e38 to 1e38 gives α = 0 and 0·shift = 0, not NaN.
    NaN logits are skipped by the max but reach s through z (propagating max).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref_new = tl.maximum(m_new, -_FLT_MAX)
    shift = tl.maximum(ref - ref_new, -_FLT_MAX)  # ≤ 0
    alpha = tl.exp2(shift * _LOG2E)
    z = tl.maximum(x - ref_new[:, None], _Z_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(z * _LOG2E)
    s_scaled = alpha * s
    if HAS_ENTROPY:
        u = alpha * u + s_scaled * shift + tl.sum(e * z, axis=1)
    s = s_scaled + tl.sum(e, axis=1)
    return m_new, ref_new, s, u


@triton.jit
def _merge_lanes(
    m,  # [LANES] per-lane max
    ref,  # [LANES] per-lane shift
    s,  # [LANES] per-lane Σe
    u,  # [LANES] per-lane Σe·z
    HAS_ENTROPY: tl.constexpr,  # merge u
):
    """(m, s, u) of the whole row from per-lane statistics, relative to the row max."""
    m_row = tl.max(m, axis=0)
    ref_row = tl.maximum(m_row, -_FLT_MAX)
    shift = tl.maximum(ref - ref_row, -_FLT_MAX)
    alpha = tl.exp2(shift * _LOG2E)
    s_scaled = alpha * s
    s_row = tl.sum(s_scaled, axis=0)
    u_row = s_row  # unused without entropy
    if HAS_ENTROPY:
        u_row = tl.sum(alpha * u + s_scaled * shift, axis=0)
    return m_row, s_row, u_row


@triton.jit
def _row_stats(
    logits_ptr,  # logits base, 16-byte aligned or not (then the loads are scalar)
    row_offset,  # int64 offset of the row from the logits base, elements
    head,  # elements before the first 16-byte boundary (_row_head)
    V,  # vocabulary size
    tile_begin,  # first body tile of this program
    tile_end,  # one past the last body tile of this program
    with_edges,  # this program also reads the row's tail and edges
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    SCALED: tl.constexpr,  # τ ≠ 1
    HAS_ENTROPY: tl.constexpr,  # also Σe·z
    VEC: tl.constexpr,  # elements per 16-byte vector
    BLOCK_V: tl.constexpr,  # elements per body tile
):
    """(m, s, u) of the body tiles [tile_begin, tile_end) of a row and, with_edges, of the
    rest of the row: the tail (whole vectors after the last tile) and the edges (the head
    and the last partial vector, fewer than 2·VEC elements, read one by one)."""
    LANES: tl.constexpr = BLOCK_V // VEC
    lanes = tl.arange(0, LANES)
    tile_offs = lanes[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [LANES, VEC]
    body = logits_ptr + tl.multiple_of(row_offset + head, VEC)  # 16-byte aligned when the base is
    m = tl.full([LANES], float("-inf"), tl.float32)
    ref = tl.full([LANES], -_FLT_MAX, tl.float32)
    s = tl.zeros([LANES], tl.float32)
    u = tl.zeros([LANES], tl.float32)
    for tile in range(tile_begin, tile_end):
        raw = tl.load(body + tl.multiple_of(tile * BLOCK_V, BLOCK_V) + tile_offs)
        m, ref, s, u = _softmax_step(_scaled(raw, temperature, inv_temperature, SCALED), m, ref, s, u, HAS_ENTROPY)
    rest = (V - head) % VEC  # elements of the last partial vector
    tail = ((V - head) // BLOCK_V) * BLOCK_V
    tail_vectors = (V - head - tail) // VEC
    if with_edges & (tail_vectors > 0):
        # Whole vectors: a mask per lane keeps the loads 16 bytes wide.
        last = tl.load(body + tail + tile_offs, mask=lanes[:, None] < tail_vectors, other=float("-inf"))
        m, ref, s, u = _softmax_step(_scaled(last, temperature, inv_temperature, SCALED), m, ref, s, u, HAS_ENTROPY)
    m, s, u = _merge_lanes(m, ref, s, u, HAS_ENTROPY)
    if with_edges & ((head > 0) | (rest > 0)):
        # The head and the last partial vector, one element per slot, folded into the merged row.
        slot = tl.arange(0, 2 * VEC)[None, :]
        col = tl.where(slot < VEC, slot, V - rest + slot - VEC)
        in_edge = tl.where(slot < VEC, slot < head, slot - VEC < rest)
        edge = tl.load(logits_ptr + row_offset + col, mask=in_edge, other=float("-inf"))
        one = tl.zeros([1], tl.float32)
        m1, ref1, s1, u1 = _softmax_step(_scaled(edge, temperature, inv_temperature, SCALED), m + one,
                                         tl.maximum(m, -_FLT_MAX) + one, s + one, u + one, HAS_ENTROPY)
        m = tl.max(m1, axis=0)
        s = tl.sum(s1, axis=0)
        u = tl.sum(u1, axis=0)
    return m, s, u


@triton.jit
def _log_scale(
    exponent,  # x of an exponential e^x
):
    """Its log scale s: x − SCALE_FROM capped at SCALE_MAX above SCALE_FROM, else 0 (NaN: 0)."""
    return tl.where(exponent > _SCALE_FROM, tl.minimum(exponent - _SCALE_FROM, _SCALE_MAX), 0.0)


@triton.jit
def _token_math(
    lp,  # log-prob of the target
    entropy,  # H
    adv,  # advantage A
    old,  # old log-prob (ignored without HAS_OLD)
    ref_lp,  # reference log-prob (ignored without HAS_REF)
    ratio_low,  # 1 − ε_low
    ratio_high,  # 1 + ε_high
    dual_clip,  # c
    kl_coef,  # β
    entropy_coef,  # η
    HAS_OLD: tl.constexpr,  # old log-probs given
    HAS_REF: tl.constexpr,  # reference log-probs given
    KL_ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 k3+
    HAS_DUAL_CLIP: tl.constexpr,  # dual clip on negative advantages
):
    """(ratio, pg, kl, loss, dlogp, log_scale, kl_log_scale) of one token, finite wherever the math is.

    NaN in A, old or ref propagates (every min/max here propagates NaN). A ratio that
    overflows (log-ratio > 88) gives the value of the branch that is actually taken: a
    clipped token its clipped value, a zero advantage 0, and both no gradient. β = 0
    adds 0·δ, never 0·inf. pg, loss and dlogp come out times e^−log_scale, kl times
    e^−kl_log_scale: both are 0 (every factor below exactly 1) unless an unclipped ratio, or
    k3's e^δ, exceeds e^SCALE_FROM, so that a token's value beyond fp32 stays finite until
    the caller has weighed it.
    """
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
    return ratio, pg, kl, loss, dlogp, scale, kl_scale


@triton.jit
def _store_token_loss(
    row, lp, entropy,
    advantages_ptr, old_logprobs_ptr, ref_logprobs_ptr, ratio_ptr, pg_ptr, kl_ptr, loss_ptr, dlogp_ptr,
    log_scale_ptr, kl_log_scale_ptr,
    ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
):
    """Row ``row``'s per-token loss from its lp and H (:func:`_token_math`), stored; returns d(ℓ)/d lp and the
    log scale it carries."""
    old = tl.load(old_logprobs_ptr + row) if HAS_OLD else 0.0
    ref_lp = tl.load(ref_logprobs_ptr + row) if HAS_REF else 0.0
    ratio, pg, kl, loss, dlogp, scale, kl_scale = _token_math(
        lp, entropy, tl.load(advantages_ptr + row), old, ref_lp, ratio_low, ratio_high, dual_clip, kl_coef,
        entropy_coef, HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP,
    )  # fmt: skip
    tl.store(ratio_ptr + row, ratio)
    tl.store(pg_ptr + row, pg)
    tl.store(kl_ptr + row, kl)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogp_ptr + row, dlogp)
    tl.store(log_scale_ptr + row, scale)
    tl.store(kl_log_scale_ptr + row, kl_scale)
    return dlogp, scale


@triton.jit
def _target_logit(
    row_ptr,  # pointer to the row's first logit
    target,  # target id
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    SCALED: tl.constexpr,  # τ ≠ 1
):
    """x_y, loaded before the row is streamed so that its latency hides behind the stream."""
    return _scaled(tl.load(row_ptr + target), temperature, inv_temperature, SCALED)


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


# ----------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _ppo_forward_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    targets_ptr,  # [N] int32 | int64 ids in [0, V)
    advantages_ptr,  # [N] fp32
    old_logprobs_ptr,  # [N] fp32, read when HAS_OLD
    ref_logprobs_ptr,  # [N] fp32, read when HAS_REF
    logprobs_ptr,  # out [N] fp32: lp = (x_y − m) − log s
    entropy_ptr,  # out [N] fp32: H
    row_max_ptr,  # out [N] fp32: m
    log_sum_ptr,  # out [N] fp32: log s
    ratio_ptr,  # out [N] fp32: r
    pg_ptr,  # out [N] fp32: clipped surrogate
    kl_ptr,  # out [N] fp32: KL estimate (0 without HAS_REF)
    loss_ptr,  # out [N] fp32: ℓ = pg + β·kl − η·H
    dlogp_ptr,  # out [N] fp32: g = dℓ/d lp (surrogate and KL parts)
    log_scale_ptr,  # out [N] fp32: s, pg, loss and dlogp are stored times e^−s
    kl_log_scale_ptr,  # out [N] fp32: the s of kl
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    ratio_low,  # 1 − ε_low
    ratio_high,  # 1 + ε_high
    dual_clip,  # c, read when HAS_DUAL_CLIP
    kl_coef,  # β
    entropy_coef,  # η
    HAS_OLD: tl.constexpr,  # old log-probs given (else r = 1)
    HAS_REF: tl.constexpr,  # reference log-probs given (else kl = 0)
    KL_ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 k3+
    HAS_DUAL_CLIP: tl.constexpr,  # dual clip on negative advantages
    SCALED: tl.constexpr,  # τ ≠ 1
    VEC: tl.constexpr,  # elements per 16-byte vector
    BLOCK_V: tl.constexpr,  # elements per tile
):
    row = tl.program_id(0)
    offset = _row_offset(row, T, stride_b, stride_t)
    row_ptr = logits_ptr + offset
    x_y = _target_logit(row_ptr, tl.load(targets_ptr + row), temperature, inv_temperature, SCALED)
    head = _row_head(offset, V, VEC)
    m, s, u = _row_stats(logits_ptr, offset, head, V, 0, (V - head) // BLOCK_V, True, temperature, inv_temperature,
                         SCALED, True, VEC, BLOCK_V)
    log_sum = tl.log(s)
    entropy = log_sum - u / s
    lp = (x_y - m) - log_sum
    tl.store(logprobs_ptr + row, lp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    _store_token_loss(
        row, lp, entropy, advantages_ptr, old_logprobs_ptr, ref_logprobs_ptr, ratio_ptr, pg_ptr, kl_ptr, loss_ptr,
        dlogp_ptr, log_scale_ptr, kl_log_scale_ptr, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
        HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP,
    )  # fmt: skip


@triton.jit(do_not_specialize=["T"])
def _logprobs_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    targets_ptr,  # [N] int32 | int64 ids in [0, V)
    logprobs_ptr,  # out [N] fp32
    entropy_ptr,  # out [N] fp32, written when HAS_ENTROPY
    row_max_ptr,  # out [N] fp32: m
    log_sum_ptr,  # out [N] fp32: log s
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    HAS_ENTROPY: tl.constexpr,  # also write H
    SCALED: tl.constexpr,  # τ ≠ 1
    VEC: tl.constexpr,  # elements per 16-byte vector
    BLOCK_V: tl.constexpr,  # elements per tile
):
    row = tl.program_id(0)
    offset = _row_offset(row, T, stride_b, stride_t)
    row_ptr = logits_ptr + offset
    x_y = _target_logit(row_ptr, tl.load(targets_ptr + row), temperature, inv_temperature, SCALED)
    head = _row_head(offset, V, VEC)
    m, s, u = _row_stats(logits_ptr, offset, head, V, 0, (V - head) // BLOCK_V, True, temperature, inv_temperature,
                         SCALED, HAS_ENTROPY, VEC, BLOCK_V)
    log_sum = tl.log(s)
    tl.store(logprobs_ptr + row, (x_y - m) - log_sum)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, log_sum - u / s)


@triton.jit(do_not_specialize=["T", "tiles_per_part", "parts"])
def _row_partials_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    partials_ptr,  # out [3, N, parts] fp32: per part (m, Σe, Σe·z) relative to its own max
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    n_rows,  # N
    tiles_per_part,  # body tiles per program
    parts,  # programs per row (the grid's axis 1)
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    HAS_ENTROPY: tl.constexpr,  # also Σe·z
    SCALED: tl.constexpr,  # τ ≠ 1
    VEC: tl.constexpr,  # elements per 16-byte vector
    BLOCK_V: tl.constexpr,  # elements per tile
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    offset = _row_offset(row, T, stride_b, stride_t)
    head = _row_head(offset, V, VEC)
    n_tiles = (V - head) // BLOCK_V
    begin = tl.minimum(part * tiles_per_part, n_tiles)
    end = tl.minimum(begin + tiles_per_part, n_tiles)
    m, s, u = _row_stats(logits_ptr, offset, head, V, begin, end, part == parts - 1, temperature,
                         inv_temperature, SCALED, HAS_ENTROPY, VEC, BLOCK_V)
    out = partials_ptr + row.to(tl.int64) * parts + part
    plane = n_rows.to(tl.int64) * parts
    tl.store(out, m)
    tl.store(out + plane, s)
    tl.store(out + 2 * plane, u)


@triton.jit(do_not_specialize=["T", "parts"])
def _combine_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V (the target logit)
    partials_ptr,  # [3, N, parts] fp32 from _row_partials_kernel
    targets_ptr,  # [N] int32 | int64 ids in [0, V)
    advantages_ptr,  # [N] fp32, read when HAS_LOSS
    old_logprobs_ptr,  # [N] fp32, read when HAS_OLD
    ref_logprobs_ptr,  # [N] fp32, read when HAS_REF
    logprobs_ptr,  # out [N] fp32
    entropy_ptr,  # out [N] fp32, written when HAS_ENTROPY
    row_max_ptr,  # out [N] fp32
    log_sum_ptr,  # out [N] fp32
    ratio_ptr,  # out [N] fp32, written when HAS_LOSS
    pg_ptr,  # out [N] fp32, written when HAS_LOSS
    kl_ptr,  # out [N] fp32, written when HAS_LOSS
    loss_ptr,  # out [N] fp32, written when HAS_LOSS
    dlogp_ptr,  # out [N] fp32, written when HAS_LOSS
    log_scale_ptr,  # out [N] fp32, written when HAS_LOSS
    kl_log_scale_ptr,  # out [N] fp32, written when HAS_LOSS
    n_rows,  # N
    parts,  # programs per row of the partials
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    ratio_low,  # 1 − ε_low
    ratio_high,  # 1 + ε_high
    dual_clip,  # c
    kl_coef,  # β
    entropy_coef,  # η
    HAS_LOSS: tl.constexpr,  # the PPO forward (else log-probs only)
    HAS_ENTROPY: tl.constexpr,  # entropy wanted (always with HAS_LOSS)
    HAS_OLD: tl.constexpr,  # old log-probs given
    HAS_REF: tl.constexpr,  # reference log-probs given
    KL_ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 k3+
    HAS_DUAL_CLIP: tl.constexpr,  # dual clip on negative advantages
    SCALED: tl.constexpr,  # τ ≠ 1
    PARTS_BLOCK: tl.constexpr,  # power of two ≥ parts
):
    row = tl.program_id(0)
    index = tl.arange(0, PARTS_BLOCK)
    in_parts = index < parts
    at = partials_ptr + row.to(tl.int64) * parts + index
    plane = n_rows.to(tl.int64) * parts
    m_part = tl.load(at, mask=in_parts, other=float("-inf"))
    s_part = tl.load(at + plane, mask=in_parts, other=0.0)
    u_part = tl.load(at + 2 * plane, mask=in_parts, other=0.0)
    m, s, u = _merge_lanes(m_part, tl.maximum(m_part, -_FLT_MAX), s_part, u_part, HAS_ENTROPY)
    log_sum = tl.log(s)
    entropy = log_sum - u / s
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    x_y = _target_logit(row_ptr, tl.load(targets_ptr + row), temperature, inv_temperature, SCALED)
    lp = (x_y - m) - log_sum
    tl.store(logprobs_ptr + row, lp)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    if HAS_LOSS:
        _store_token_loss(
            row, lp, entropy, advantages_ptr, old_logprobs_ptr, ref_logprobs_ptr, ratio_ptr, pg_ptr, kl_ptr, loss_ptr,
            dlogp_ptr, log_scale_ptr, kl_log_scale_ptr, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
            HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP,
        )  # fmt: skip


@triton.jit(do_not_specialize=["T", "tiles_per_part", "parts"])
def _ppo_backward_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    grad_ptr,  # out [B, T, V] logits dtype, stride 1 on V; may be logits_ptr
    targets_ptr,  # [N] int32 | int64 ids in [0, V), or −1: no one-hot term (vocab shard)
    row_max_ptr,  # [N] fp32 m from the forward
    log_sum_ptr,  # [N] fp32 log s from the forward
    entropy_ptr,  # [N] fp32 H from the forward
    coef_logprob_ptr,  # [N] fp32 c_lp = d(loss)/d lp
    coef_entropy_ptr,  # [N] fp32 c_H = η · weight · upstream grad
    outside_ptr,  # [N] fp32 probability on other vocabulary shards, read when HAS_OUTSIDE
    partials_ptr,  # out [N, parts] fp32 Σ_{j≠y} p_j of each part, written when parts > 1
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    grad_stride_b,  # grad stride of B, elements
    grad_stride_t,  # grad stride of T, elements
    tiles_per_part,  # body tiles per program
    parts,  # programs per row (the grid's axis 1)
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    SCALED: tl.constexpr,  # τ ≠ 1
    GRAD_ALIGNED: tl.constexpr,  # grad rows sit at the logits rows' 16-byte phase
    HAS_OUTSIDE: tl.constexpr,  # the rows are vocabulary shards
    VEC: tl.constexpr,  # elements per 16-byte vector
    BLOCK_V: tl.constexpr,  # elements per tile
):
    """d(loss)/d(logits_j) = (1/τ)·[c_lp·(1[j=y] − p_j) + c_H·p_j·(log p_j + H)].

    The sweep also sums Σ_{j≠y} p_j, the one-hot factor 1 − p_y of a confident target (the sum,
    with the probability on other shards, below 1/2), where 1 − p_y itself would lose its digits
    to cancellation. A row in one program writes such a target's entry again after the sweep;
    split rows leave their partial sums to _target_fixup_kernel.
    """
    row = tl.program_id(0)  # rows on axis 0: axes 1 and 2 stop at 65535
    part = tl.program_id(1)
    coef_logprob = tl.load(coef_logprob_ptr + row)
    coef_entropy = tl.load(coef_entropy_ptr + row)
    offset = _row_offset(row, T, stride_b, stride_t)
    grad_offset = _row_offset(row, T, grad_stride_b, grad_stride_t)
    grad_row = grad_ptr + grad_offset
    head = _row_head(offset, V, VEC)
    n_tiles = (V - head) // BLOCK_V
    begin = tl.minimum(part * tiles_per_part, n_tiles)
    end = tl.minimum(begin + tiles_per_part, n_tiles)
    tail = n_tiles * BLOCK_V  # from the body's start
    rest = (V - head) % VEC  # elements of the last partial vector
    tail_len = tl.multiple_of(V - head - tail - rest, VEC)  # whole vectors after the last tile
    cols = tl.arange(0, BLOCK_V)
    slot = tl.arange(0, 2 * VEC)
    edge_col = tl.where(slot < VEC, slot, V - rest + slot - VEC)  # the head, then the last partial vector
    in_edge = tl.where(slot < VEC, slot < head, slot - VEC < rest)
    body = logits_ptr + tl.multiple_of(offset + head, VEC)
    if GRAD_ALIGNED:
        grad_body = grad_ptr + tl.multiple_of(grad_offset + head, VEC)
    else:
        grad_body = grad_row + head
    last_part = part == parts - 1
    out_dtype = grad_ptr.dtype.element_ty
    # A row with both coefficients 0 (a masked token) has a zero gradient: no reads.
    if (coef_logprob != 0.0) | (coef_entropy != 0.0):
        target = tl.load(targets_ptr + row).to(tl.int32)
        ref = tl.maximum(tl.load(row_max_ptr + row), -_FLT_MAX)
        log_sum = tl.load(log_sum_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        whole_row = parts == 1
        # Read before the sweep (in place, the logits are overwritten); a split row's other programs must not.
        x_y = _scaled(tl.load(logits_ptr + offset + tl.maximum(target, 0), mask=whole_row & (target >= 0),
                              other=0.0), temperature, inv_temperature, SCALED)
        coef_z, coef_const, coef_onehot, shift, finite = _coefficients(coef_logprob, coef_entropy, entropy,
                                                                       temperature, inv_temperature)
        coef_onehot = coef_onehot * tl.exp(shift)  # in a row that is not finite the target's entry is written again
        others = tl.zeros([BLOCK_V // VEC], tl.float32)  # e^shift·Σ_{j≠y} p_j, per 16-byte vector slot
        others_edge = tl.zeros([], tl.float32)
        for tile in range(begin, end):
            start = tl.multiple_of(tile * BLOCK_V, BLOCK_V)
            raw = tl.load(body + start + cols)
            grad, p = _grad_terms(_scaled(raw, temperature, inv_temperature, SCALED), ref, log_sum, coef_z,
                                  coef_const, shift)
            is_target = cols == target - head - start  # int32, tile-local
            grad += tl.where(is_target, coef_onehot, 0.0)
            others += tl.sum(tl.reshape(tl.where(is_target, 0.0, p), [BLOCK_V // VEC, VEC]), axis=1)
            tl.store(grad_body + start + cols, _to_output(grad, out_dtype))
        if last_part & (tail_len > 0):
            in_tail = cols < tail_len
            last = tl.load(body + tail + cols, mask=in_tail, other=0.0)
            grad_last, p = _grad_terms(_scaled(last, temperature, inv_temperature, SCALED), ref, log_sum, coef_z,
                                       coef_const, shift)
            is_target = cols == target - head - tail
            grad_last += tl.where(is_target, coef_onehot, 0.0)
            others += tl.sum(tl.reshape(tl.where(in_tail & ~is_target, p, 0.0), [BLOCK_V // VEC, VEC]), axis=1)
            tl.store(grad_body + tail + cols, _to_output(grad_last, out_dtype), mask=in_tail)
        if last_part & ((head > 0) | (rest > 0)):
            edge = tl.load(logits_ptr + offset + edge_col, mask=in_edge, other=0.0)
            grad_edge, p_edge = _grad_terms(_scaled(edge, temperature, inv_temperature, SCALED), ref, log_sum,
                                            coef_z, coef_const, shift)
            grad_edge += tl.where(edge_col == target, coef_onehot, 0.0)
            tl.store(grad_row + edge_col, _to_output(grad_edge, out_dtype), mask=in_edge)
            others_edge = tl.sum(tl.where(in_edge & (edge_col != target), p_edge, 0.0), axis=0)
        others_sum = (tl.sum(others, axis=0) + others_edge) * tl.exp(-shift)
        if whole_row:
            if HAS_OUTSIDE:
                others_sum += tl.load(outside_ptr + row)
            if (target >= 0) & ((others_sum < 0.5) | ~finite):
                lp_y = (x_y - ref) - log_sum
                p_y = tl.exp(lp_y)
                one_minus_p_y = tl.where(others_sum < 0.5, others_sum, 1.0 - p_y)
                grad_y = _target_grad(coef_logprob, coef_entropy, entropy, p_y, lp_y, one_minus_p_y, 1.0,
                                      inv_temperature)
                tl.debug_barrier()  # after every thread's stores of the sweep
                tl.store(grad_row + target, _to_output(grad_y, out_dtype))
        else:
            tl.store(partials_ptr + row.to(tl.int64) * parts + part, others_sum)
    else:
        zeros = tl.zeros([BLOCK_V], tl.float32).to(out_dtype)
        for tile in range(begin, end):
            tl.store(grad_body + tl.multiple_of(tile * BLOCK_V, BLOCK_V) + cols, zeros)
        if last_part:
            tl.store(grad_body + tail + cols, zeros, mask=cols < tail_len)
            tl.store(grad_row + edge_col, tl.zeros([2 * VEC], tl.float32).to(out_dtype), mask=in_edge)


@triton.jit(do_not_specialize=["T", "parts"])
def _target_fixup_kernel(
    grad_ptr,  # [B, T, V] the backward's output, whose target entries may be written again
    targets_ptr,  # [N] int32 | int64 ids, or −1: no one-hot term
    entropy_ptr,  # [N] fp32 H
    coef_logprob_ptr,  # [N] fp32 c_lp
    coef_entropy_ptr,  # [N] fp32 c_H
    outside_ptr,  # [N] fp32 probability on other vocabulary shards, read when HAS_OUTSIDE
    partials_ptr,  # [N, parts] fp32 Σ_{j≠y} p_j of each part (_ppo_backward_kernel)
    n_rows,  # N
    parts,  # programs per row of the backward
    T,  # rows per leading index
    grad_stride_b,  # grad stride of B, elements
    grad_stride_t,  # grad stride of T, elements
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    HAS_OUTSIDE: tl.constexpr,  # the rows are vocabulary shards
    ROWS: tl.constexpr,  # rows per program
    PARTS_BLOCK: tl.constexpr,  # power of two ≥ parts
):
    """The target entries of split rows that need their own formula: a confident target's one-hot
    factor is Σ_{j≠y} p_j (the partial sums, plus the probability on other shards), and p_y = 1 − that
    (no logit is read: in place they are gone); a row whose coefficients are not finite over τ gets
    the same product form (_coefficients)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_rows = rows < n_rows
    coef_logprob = tl.load(coef_logprob_ptr + rows, mask=in_rows, other=0.0)
    coef_entropy = tl.load(coef_entropy_ptr + rows, mask=in_rows, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=in_rows, other=0.0)
    target = tl.load(targets_ptr + rows, mask=in_rows, other=-1).to(tl.int32)
    index = tl.arange(0, PARTS_BLOCK)
    at = partials_ptr + rows.to(tl.int64)[:, None] * parts + index[None, :]
    others = tl.sum(tl.load(at, mask=in_rows[:, None] & (index[None, :] < parts), other=0.0), axis=1)
    if HAS_OUTSIDE:
        others += tl.load(outside_ptr + rows, mask=in_rows, other=0.0)
    finite = _coefficients(coef_logprob, coef_entropy, entropy, temperature, inv_temperature)[4]
    live = (coef_logprob != 0.0) | (coef_entropy != 0.0)
    write = in_rows & live & (target >= 0) & ((others < 0.5) | ~finite)
    p_y = 1.0 - others
    grad_y = _target_grad(coef_logprob, coef_entropy, entropy, p_y, tl.log(p_y), others, 1.0, inv_temperature)
    at_target = grad_ptr + _row_offset(rows, T, grad_stride_b, grad_stride_t) + tl.maximum(target, 0)
    tl.store(at_target, _to_output(grad_y, grad_ptr.dtype.element_ty), mask=write)


@triton.jit(do_not_specialize=["T"])
def _ppo_forward_grad_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V, rows 16-byte aligned
    grad_ptr,  # out [B, T, V] logits dtype, stride 1 on V, rows 16-byte aligned
    targets_ptr,  # [N] int32 | int64 ids in [0, V)
    advantages_ptr,  # [N] fp32
    old_logprobs_ptr,  # [N] fp32, read when HAS_OLD
    ref_logprobs_ptr,  # [N] fp32, read when HAS_REF
    weights_ptr,  # [N] fp32 aggregation weight w: loss = Σ w·ℓ
    logprobs_ptr,  # out [N] fp32
    entropy_ptr,  # out [N] fp32
    row_max_ptr,  # out [N] fp32
    log_sum_ptr,  # out [N] fp32
    ratio_ptr,  # out [N] fp32
    pg_ptr,  # out [N] fp32
    kl_ptr,  # out [N] fp32
    loss_ptr,  # out [N] fp32
    dlogp_ptr,  # out [N] fp32
    log_scale_ptr,  # out [N] fp32
    kl_log_scale_ptr,  # out [N] fp32
    V,  # vocabulary size, a multiple of VEC in (ROW_BLOCK / 2, ROW_BLOCK]
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    grad_stride_b,  # grad stride of B, elements
    grad_stride_t,  # grad stride of T, elements
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    ratio_low,  # 1 − ε_low
    ratio_high,  # 1 + ε_high
    dual_clip,  # c
    kl_coef,  # β
    entropy_coef,  # η
    HAS_OLD: tl.constexpr,  # old log-probs given
    HAS_REF: tl.constexpr,  # reference log-probs given
    KL_ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 k3+
    HAS_DUAL_CLIP: tl.constexpr,  # dual clip on negative advantages
    SCALED: tl.constexpr,  # τ ≠ 1
    VEC: tl.constexpr,  # elements per 16-byte vector
    ROW_BLOCK: tl.constexpr,  # power of two ≥ V: the whole row in registers
):
    """Forward of one row, then d(Σ w·ℓ)/d(logits) of it from the same registers.

    The row is held as four chunks so that the gradient of one chunk is stored before
    the next is computed: the registers hold the row once, as loaded, plus one chunk.
    """
    CHUNK: tl.constexpr = ROW_BLOCK // 4
    LANES: tl.constexpr = CHUNK // VEC
    row = tl.program_id(0)
    offset = _row_offset(row, T, stride_b, stride_t, VEC)
    row_ptr = logits_ptr + offset
    cols = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [LANES, VEC]
    n = tl.multiple_of(V // VEC * VEC, VEC)  # = V
    raw0 = tl.load(row_ptr + cols)  # V > ROW_BLOCK / 2: the first two chunks are whole
    raw1 = tl.load(row_ptr + CHUNK + cols)
    raw2 = tl.load(row_ptr + 2 * CHUNK + cols, mask=cols + 2 * CHUNK < n, other=float("-inf"))
    raw3 = tl.load(row_ptr + 3 * CHUNK + cols, mask=cols + 3 * CHUNK < n, other=float("-inf"))
    target = tl.load(targets_ptr + row).to(tl.int32)
    # Read before any gradient is stored: out may be the logits themselves.
    x_y = _target_logit(row_ptr, target, temperature, inv_temperature, SCALED)
    m = tl.full([LANES], float("-inf"), tl.float32)
    ref = tl.full([LANES], -_FLT_MAX, tl.float32)
    s = tl.zeros([LANES], tl.float32)
    u = tl.zeros([LANES], tl.float32)
    m, ref, s, u = _softmax_step(_scaled(raw0, temperature, inv_temperature, SCALED), m, ref, s, u, True)
    m, ref, s, u = _softmax_step(_scaled(raw1, temperature, inv_temperature, SCALED), m, ref, s, u, True)
    m, ref, s, u = _softmax_step(_scaled(raw2, temperature, inv_temperature, SCALED), m, ref, s, u, True)
    m, ref, s, u = _softmax_step(_scaled(raw3, temperature, inv_temperature, SCALED), m, ref, s, u, True)
    lane_ref, lane_s = ref, s
    m, s, u = _merge_lanes(m, ref, s, u, True)
    ref = tl.maximum(m, -_FLT_MAX)
    # Σ_{j≠y} p_j (a confident target's 1 − p_y without cancellation), with no work per logit: every other
    # lane's running sum now, and the target's own lane (four vectors, read again without the target before any
    # gradient is stored: out may be the logits) once the row's registers are free, after the stores.
    lane = (target % CHUNK) // VEC
    lane_scale = tl.exp2(tl.maximum(lane_ref - ref, -_FLT_MAX) * _LOG2E)
    others = tl.sum(tl.where(tl.arange(0, LANES) != lane, lane_scale * lane_s, 0.0), axis=0)
    k = tl.arange(0, 4 * VEC)
    own_col = (k // VEC) * CHUNK + lane * VEC + k % VEC
    own_mask = (own_col < n) & (own_col != target)
    own = tl.load(row_ptr + own_col, mask=own_mask, other=0.0)
    log_sum = tl.log(s)
    entropy = log_sum - u / s
    lp = (x_y - m) - log_sum
    tl.store(logprobs_ptr + row, lp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    dlogp, scale = _store_token_loss(
        row, lp, entropy, advantages_ptr, old_logprobs_ptr, ref_logprobs_ptr, ratio_ptr, pg_ptr, kl_ptr, loss_ptr,
        dlogp_ptr, log_scale_ptr, kl_log_scale_ptr, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
        HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP,
    )  # fmt: skip
    weight = tl.load(weights_ptr + row)
    # (1/τ)·[c_lp·(1[j=y] − p_j) + c_H·p_j·(log p_j + H)] with c_lp = w·g, c_H = w·η, both times e^−s (g is
    # stored so): finite coefficients, e^s (1 unless a term exceeds e^64) folded into each probability.
    coef_logprob = weight * dlogp
    coef_entropy = weight * entropy_coef * tl.exp(-scale)
    coef_z = coef_entropy * inv_temperature
    coef_const = (coef_entropy * entropy - coef_logprob) * inv_temperature
    coef_onehot = coef_logprob * inv_temperature
    live = weight != 0.0  # a masked token: exact zeros, whatever its logits hold
    grad_row = grad_ptr + _row_offset(row, T, grad_stride_b, grad_stride_t, VEC)
    zero = (log_sum != log_sum).to(tl.int32)  # 0, or the row is NaN and so is every output
    if live:
        _store_grad_chunk(grad_row, raw0, cols, n, zero, ref, log_sum, coef_z, coef_const, scale, temperature,
                          inv_temperature, SCALED)
        _store_grad_chunk(grad_row + CHUNK, raw1, cols, n - CHUNK, zero, ref, log_sum, coef_z, coef_const, scale,
                          temperature, inv_temperature, SCALED)
        _store_grad_chunk(grad_row + 2 * CHUNK, raw2, cols, n - 2 * CHUNK, zero, ref, log_sum, coef_z, coef_const,
                          scale, temperature, inv_temperature, SCALED)
        _store_grad_chunk(grad_row + 3 * CHUNK, raw3, cols, n - 3 * CHUNK, zero, ref, log_sum, coef_z, coef_const,
                          scale, temperature, inv_temperature, SCALED)
    else:  # exact zeros, whatever the logits hold
        zeros = tl.zeros([LANES, VEC], tl.float32).to(grad_ptr.dtype.element_ty)
        tl.store(grad_row + cols, zeros, mask=cols < n)
        tl.store(grad_row + CHUNK + cols, zeros, mask=cols + CHUNK < n)
        tl.store(grad_row + 2 * CHUNK + cols, zeros, mask=cols + 2 * CHUNK < n)
        tl.store(grad_row + 3 * CHUNK + cols, zeros, mask=cols + 3 * CHUNK < n)
    # The target's one-hot term: its element written again, after every thread's stores. A confident
    # target's 1 − p_y is Σ_{j≠y} p_j (1 − p_y itself would cancel); a scaled row's entry is one product
    # (two terms times e^s could be inf − inf).
    tl.debug_barrier()
    own = _scaled(own, temperature, inv_temperature, SCALED)
    others += tl.sum(tl.where(own_mask, tl.exp2(tl.maximum(own - ref, _Z_FLOOR) * _LOG2E), 0.0), axis=0)
    others = others / s
    grad_y = _grad_terms(x_y, ref, log_sum, coef_z, coef_const, scale)[0] + coef_onehot
    lp_y = (x_y - ref) - log_sum
    p_y = tl.exp(lp_y)
    special = _target_grad(coef_logprob, coef_entropy, entropy, p_y, lp_y,
                           tl.where(others < 0.5, others, 1.0 - p_y), tl.exp(scale), inv_temperature)
    grad_y = tl.where((others < 0.5) | (scale > 0.0), special, grad_y)
    tl.store(grad_row + target, _to_output(tl.where(live, grad_y, 0.0), grad_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------
# Launchers: no allocation except the split-row partials; no autograd.
# ----------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    block_v: int  # elements per tile of the streaming kernels (forward, logprobs)
    num_warps: int
    bwd_block_v: int  # elements per backward tile
    bwd_num_warps: int
    parts: int = 1  # programs per row of the forward (1: the one-pass kernels)
    bwd_parts: int = 1  # programs per row of the backward
    grad_row_block: int = 0  # ROW_BLOCK of the gradient-in-forward kernel; 0: it does not apply
    grad_num_warps: int = 0
    grad_max_registers: int = 0  # per thread: two programs per SM, one loads while the other computes


_TILE_BYTES = 8192  # the largest tile: 4 warps × 32 threads × four 16-byte vectors
_GRAD_ROW_BYTES = 65536  # the largest row the gradient-in-forward kernel holds in registers
_DEFAULT_SMS = 132  # H100 / H200, for launches without a CUDA device (interpreter, static model)
_FIXUP_ROWS = 32  # rows per program of the target fixup: one warp, one row per thread


def launch_config(vocab: int, dtype: torch.dtype, rows: int = 1 << 30, num_sms: int = _DEFAULT_SMS) -> LaunchConfig:
    """Tiles, warps and row splits for a vocabulary size, logits dtype and row count.

    Every thread reads four 16-byte vectors per tile: rows of 32 KiB and more get 4 warps
    (8 KiB tiles), smaller rows 2 or 1, since each warp also pays the per-row merge and
    loss math once. A row is split across programs only when the rows alone give fewer
    than four programs per SM (about eight programs per SM in all). The
    gradient-in-forward kernel holds a row of at most 64 KiB in the registers of 8 warps
    (64 per thread, 128 in all): two programs per SM and no spills, which
    benchmarks/static_roofline.py checks.
    """
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    row_bytes = vocab * elem_bytes
    warps = 4 if row_bytes >= 4 * _TILE_BYTES else 2 if row_bytes >= 2 * _TILE_BYTES else 1
    block = warps * _TILE_BYTES // 4 // elem_bytes  # four 16-byte vectors per thread
    tiles = max(1, vocab // block)
    parts = 1
    if rows < 4 * num_sms:
        parts = min(tiles, triton.cdiv(8 * num_sms, max(rows, 1)), 64)
        parts = max(1, parts)
    row_block = triton.next_power_of_2(vocab)
    # The row is held as four chunks of whole 16-byte vectors: at least 64 bytes, at most 64 KiB.
    grad_block = row_block if 64 <= row_block * elem_bytes <= _GRAD_ROW_BYTES else 0
    grad_warps = max(1, min(8, row_block * elem_bytes // 8192)) if grad_block else 0
    return LaunchConfig(block, warps, block, warps, parts, parts, grad_block, grad_warps, 128 if grad_block else 0)


def _rows(logits: torch.Tensor):
    batch, seq, vocab = logits.shape
    return batch * seq, seq, vocab


def _vec(logits: torch.Tensor) -> int:
    return 16 // logits.element_size()


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _inv(temperature: float) -> float:
    """fp32(1 / fp32(τ)), correctly rounded, which the exact division needs: the fp64 quotient
    rounded to fp32 is (rounding twice is harmless for a division of fp32 numbers in fp64).
    Plain Python: no tensor, nothing for torch.compile to trace."""
    return _fp32(1.0 / _fp32(temperature))


def _split_forward(logits, targets, outputs, advantages, old, ref, scalars, switches, has_loss, has_entropy, cfg):
    rows, seq, vocab = _rows(logits)
    temperature = scalars[0]
    vec = _vec(logits)
    tiles_per_part, parts = _split(vocab, cfg.block_v, cfg.parts)
    partials = torch.empty((3, rows, parts), dtype=torch.float32, device=logits.device)
    wrap_triton(_row_partials_kernel)[(rows, parts)](
        # data
        logits, partials,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), rows, tiles_per_part, parts,
        # constants
        temperature, _inv(temperature),
        # switches
        HAS_ENTROPY=has_entropy,
        SCALED=temperature != 1.0,
        VEC=vec,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    wrap_triton(_combine_kernel)[(rows,)](
        # data
        logits, partials, targets, advantages, old, ref, *outputs,
        # shapes and strides
        rows, parts, seq, logits.stride(0), logits.stride(1),
        # constants
        *scalars,
        # switches
        HAS_LOSS=has_loss,
        HAS_ENTROPY=has_entropy,
        **switches,
        PARTS_BLOCK=triton.next_power_of_2(parts),
        num_warps=1,
    )  # fmt: skip


def ppo_forward(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: Optional[torch.Tensor],  # [N] fp32
    ref_logprobs: Optional[torch.Tensor],  # [N] fp32
    outputs,  # 11 fp32 [N] buffers in TokenResults order
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,  # 0 disables it
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    has_old, has_ref = old_logprobs is not None, ref_logprobs is not None
    old = old_logprobs if has_old else advantages  # never read: a valid pointer
    ref = ref_logprobs if has_ref else advantages
    scalars = (temperature, _inv(temperature), ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef)
    switches = dict(
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        KL_ESTIMATOR=kl_estimator if has_ref else 0,  # one variant when there is no KL
        HAS_DUAL_CLIP=dual_clip > 0.0,
        SCALED=temperature != 1.0,
    )
    if cfg.parts > 1:
        _split_forward(logits, targets, outputs, advantages, old, ref, scalars, switches, True, True, cfg)
        return
    wrap_triton(_ppo_forward_kernel)[(rows,)](
        # data
        logits, targets, advantages, old, ref, *outputs,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        *scalars,
        # switches
        **switches,
        VEC=_vec(logits),
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip


def ppo_backward(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    row_max: torch.Tensor,  # [N] fp32
    log_sum: torch.Tensor,  # [N] fp32
    entropy: torch.Tensor,  # [N] fp32
    coef_logprob: torch.Tensor,  # [N] fp32
    coef_entropy: torch.Tensor,  # [N] fp32
    temperature: float,
    out: torch.Tensor,  # [B, T, V] logits dtype, stride 1 on V; may be logits
    outside: Optional[torch.Tensor] = None,  # [N] fp32 probability on other vocabulary shards
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    vec = _vec(logits)
    tiles_per_part, parts = _split(vocab, cfg.bwd_block_v, cfg.bwd_parts)
    # Split rows leave Σ_{j≠y} p_j per part to the fixup kernel (a few bytes per row); whole rows need none.
    partials = torch.empty((rows, parts) if parts > 1 else (1,), dtype=torch.float32, device=logits.device)
    has_outside = outside is not None
    wrap_triton(_ppo_backward_kernel)[(rows, parts)](
        # data
        logits, out, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy,
        outside if has_outside else entropy,  # never read without HAS_OUTSIDE: a valid pointer
        partials,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), tiles_per_part, parts,
        # constants
        temperature, _inv(temperature),
        # switches
        SCALED=temperature != 1.0,
        GRAD_ALIGNED=_same_phase(logits, out),
        HAS_OUTSIDE=has_outside,
        VEC=vec,
        BLOCK_V=cfg.bwd_block_v,
        num_warps=cfg.bwd_num_warps,
    )  # fmt: skip
    if parts == 1:
        return
    wrap_triton(_target_fixup_kernel)[(triton.cdiv(rows, _FIXUP_ROWS),)](
        # data
        out, targets, entropy, coef_logprob, coef_entropy, outside if has_outside else entropy, partials,
        # shapes and strides
        rows, parts, seq, out.stride(0), out.stride(1),
        # constants
        temperature, _inv(temperature),
        # switches
        HAS_OUTSIDE=has_outside,
        ROWS=_FIXUP_ROWS,
        PARTS_BLOCK=triton.next_power_of_2(parts),
        num_warps=1,
    )  # fmt: skip


def logprobs(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    out_logprobs: torch.Tensor,  # [N] fp32
    out_entropy: Optional[torch.Tensor],  # [N] fp32 or None
    out_row_max: torch.Tensor,  # [N] fp32
    out_log_sum: torch.Tensor,  # [N] fp32
    temperature: float,
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    has_entropy = out_entropy is not None
    entropy = out_entropy if has_entropy else out_logprobs  # never written: a valid pointer
    if cfg.parts > 1:
        scalars = (temperature, _inv(temperature), 0.0, 0.0, 0.0, 0.0, 0.0)
        switches = dict(HAS_OLD=False, HAS_REF=False, KL_ESTIMATOR=0, HAS_DUAL_CLIP=False, SCALED=temperature != 1.0)
        lp = out_logprobs
        outputs = (lp, entropy, out_row_max, out_log_sum) + (lp,) * 7  # the loss outputs are never written
        _split_forward(logits, targets, outputs, lp, lp, lp, scalars, switches, False, has_entropy, cfg)
        return
    wrap_triton(_logprobs_kernel)[(rows,)](
        # data
        logits, targets, out_logprobs, entropy, out_row_max, out_log_sum,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        temperature, _inv(temperature),
        # switches
        HAS_ENTROPY=has_entropy,
        SCALED=temperature != 1.0,
        VEC=_vec(logits),
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip


def forward_grad_applies(logits: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`ppo_forward_grad` runs for these tensors: bf16 or fp32 rows of at most
    64 KiB (``launch_config``) whose lengths and strides, in logits and in out, are multiples
    of 16 bytes (so every row starts at the 16-byte phase of the tensor's start; a start on a
    16-byte boundary, the rule for fresh allocations, then gives 16-byte access, else scalar
    access with the same results). fp16 rows are left to forward + backward: their second
    conversion to fp32 would stay live between the passes and spill. Shapes and strides only:
    it also decides for the fake tensors of torch.compile."""
    vocab = logits.shape[-1]
    vec = _vec(logits)
    strides = all(t.stride(0) % vec == 0 and t.stride(1) % vec == 0 for t in (logits, out))
    return (
        logits.dtype in (torch.bfloat16, torch.float32)
        and launch_config(vocab, logits.dtype).grad_row_block > 0
        and vocab % vec == 0
        and strides
    )


def ppo_forward_grad(
    logits: torch.Tensor,  # [B, T, V], rows 16-byte aligned, V·b ≤ 64 KiB
    targets: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: Optional[torch.Tensor],  # [N] fp32
    ref_logprobs: Optional[torch.Tensor],  # [N] fp32
    weights: torch.Tensor,  # [N] fp32 per-token aggregation weights
    outputs,  # 11 fp32 [N] buffers in TokenResults order
    out: torch.Tensor,  # [B, T, V] logits dtype: d(Σ w·ℓ)/d(logits)
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if not forward_grad_applies(logits, out):
        raise ValueError(f"logits: the gradient-in-forward kernel takes bf16 or fp32 rows of at most "
                         f"{_GRAD_ROW_BYTES} bytes starting on 16-byte boundaries; got {tuple(logits.shape)} "
                         f"{logits.dtype} with strides {logits.stride()} (out {out.stride()}); use ppo_forward + "
                         f"ppo_backward")  # fmt: skip
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    has_old, has_ref = old_logprobs is not None, ref_logprobs is not None
    wrap_triton(_ppo_forward_grad_kernel)[(rows,)](
        # data
        logits, out, targets, advantages,
        old_logprobs if has_old else advantages,  # never read: a valid pointer
        ref_logprobs if has_ref else advantages,
        weights, *outputs,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        # constants
        temperature, _inv(temperature), ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
        # switches
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        KL_ESTIMATOR=kl_estimator if has_ref else 0,
        HAS_DUAL_CLIP=dual_clip > 0.0,
        SCALED=temperature != 1.0,
        VEC=_vec(logits),
        ROW_BLOCK=cfg.grad_row_block,
        num_warps=cfg.grad_num_warps,
        maxnreg=cfg.grad_max_registers,
    )  # fmt: skip


def _split(vocab: int, block: int, parts: int):
    """(body tiles per program, programs per row): no program without a tile."""
    tiles = max(1, vocab // block)
    per_part = triton.cdiv(tiles, max(1, parts))
    return per_part, triton.cdiv(tiles, per_part)


def _sms(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _DEFAULT_SMS


def _same_phase(logits: torch.Tensor, out: torch.Tensor) -> bool:
    """Every row of out sits at the 16-byte phase of its logits row (relative to each tensor's
    start): one head serves both, and the gradient's stores stay 16 bytes wide."""
    vec = _vec(logits)
    return (out.stride(0) - logits.stride(0)) % vec == 0 and (out.stride(1) - logits.stride(1)) % vec == 0
