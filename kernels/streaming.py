"""Reading a row of logits: the streaming helpers every kernel of :mod:`.ppo_loss` shares.

A row is a head (the elements before its first 16-byte boundary), a body of whole tiles, a tail of
whole vectors and a last partial vector (see :mod:`.ppo_loss`). The online-softmax step is written
once here (``_softmax_step``) and folded per lane; ``_row_stats`` gives a row's (m, s, Σe·z).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 the kernels run in numpy, whose fma rounds twice and whose
# fp32→bf16 cast truncates; the two helpers that depend on either take the numpy route
# there, with the same results (tests check both routes against the same rounding).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_LOG2E = tl.constexpr(1.4426950408889634)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# exp(z) for z < −128 is 0 in fp32 (below the smallest denormal): such an element adds
# exactly 0 to Σe and Σe·z, and clamping z there keeps e·z = 0·(−inf) out of the sums.
_Z_FLOOR = tl.constexpr(-128.0)


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
def _target_logit(
    row_ptr,  # pointer to the row's first logit
    target,  # target id
    temperature,  # τ
    inv_temperature,  # fp32(1 / τ)
    SCALED: tl.constexpr,  # τ ≠ 1
):
    """x_y, loaded before the row is streamed so that its latency hides behind the stream."""
    return _scaled(tl.load(row_ptr + target), temperature, inv_temperature, SCALED)
