"""The backward kernels: d(loss)/d(logits) over (rows, parts of a row), then the target entries of confident
targets (:mod:`.ppo_loss` launches them)."""

from __future__ import annotations

import triton
import triton.language as tl

from .row_gradient import _coefficients, _grad_terms, _target_grad, _to_output
from .streaming import (
    _FLT_MAX,
    _row_head,
    _row_offset,
    _scaled,
)


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
