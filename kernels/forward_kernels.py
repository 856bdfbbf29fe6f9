"""The kernels that read each row once for the forward: the one-pass forward and log-probs, the split-row
partials and their combination, and the gradient-in-forward kernel (:mod:`.ppo_loss` launches them)."""

from __future__ import annotations

import triton
import triton.language as tl

from .row_gradient import _grad_terms, _store_grad_chunk, _target_grad, _to_output
from .streaming import (
    _FLT_MAX,
    _LOG2E,
    _Z_FLOOR,
    _merge_lanes,
    _row_head,
    _row_offset,
    _row_stats,
    _scaled,
    _softmax_step,
    _target_logit,
)
from .token_math import _store_token_loss


@triton.jit
def _store_row_results(
    row,  # row index
    x_y,  # the target's scaled logit
    m,  # row max
    s,  # Σ exp(x − m)
    u,  # Σ exp(x − m)·(x − m), read when HAS_ENTROPY
    logprobs_ptr,  # out [N] fp32: lp = (x_y − m) − log s
    entropy_ptr,  # out [N] fp32: H = log s − u / s, written when HAS_ENTROPY
    row_max_ptr,  # out [N] fp32: m
    log_sum_ptr,  # out [N] fp32: log s
    HAS_ENTROPY: tl.constexpr,  # also H
):
    """A row's results from its statistics, stored; returns (lp, H, log s)."""
    log_sum = tl.log(s)
    entropy = log_sum - u / s
    lp = (x_y - m) - log_sum
    tl.store(logprobs_ptr + row, lp)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    return lp, entropy, log_sum


@triton.jit
def _one_pass_row(
    row, logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, row_max_ptr, log_sum_ptr, V, T, stride_b, stride_t,
    temperature, inv_temperature,
    SCALED: tl.constexpr, HAS_ENTROPY: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """A row read in one pass (its target logit first, the load's latency hidden behind the stream) and its results
    stored (:func:`_store_row_results`, the arguments named as in the kernels); returns (lp, H)."""
    offset = _row_offset(row, T, stride_b, stride_t)
    x_y = _target_logit(logits_ptr + offset, tl.load(targets_ptr + row), temperature, inv_temperature, SCALED)
    head = _row_head(offset, V, VEC)
    m, s, u = _row_stats(logits_ptr, offset, head, V, 0, (V - head) // BLOCK_V, True, temperature, inv_temperature,
                         SCALED, HAS_ENTROPY, VEC, BLOCK_V)
    lp, entropy, _ = _store_row_results(row, x_y, m, s, u, logprobs_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,
                                        HAS_ENTROPY)
    return lp, entropy


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
    lp, entropy = _one_pass_row(row, logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, row_max_ptr, log_sum_ptr, V, T,
                                stride_b, stride_t, temperature, inv_temperature, SCALED, True, VEC, BLOCK_V)
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
    _one_pass_row(tl.program_id(0), logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, row_max_ptr, log_sum_ptr, V,
                  T, stride_b, stride_t, temperature, inv_temperature, SCALED, HAS_ENTROPY, VEC, BLOCK_V)


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
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    x_y = _target_logit(row_ptr, tl.load(targets_ptr + row), temperature, inv_temperature, SCALED)
    lp, entropy, _ = _store_row_results(row, x_y, m, s, u, logprobs_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,
                                        HAS_ENTROPY)
    if HAS_LOSS:
        _store_token_loss(
            row, lp, entropy, advantages_ptr, old_logprobs_ptr, ref_logprobs_ptr, ratio_ptr, pg_ptr, kl_ptr, loss_ptr,
            dlogp_ptr, log_scale_ptr, kl_log_scale_ptr, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
            HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP,
        )  # fmt: skip


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
    lp, entropy, log_sum = _store_row_results(row, x_y, m, s, u, logprobs_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,
                                              True)
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
