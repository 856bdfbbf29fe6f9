"""Triton kernels of the fused PPO loss (the per-token math and gradient of docs/contract.md) and their launchers.

Logits are read as ``[B, T, V]`` with free strides on B and T and stride 1 on V; row
``i`` of the ``N = B·T`` rows is ``(i // T, i % T)``, so ``logits[:, :-1]`` needs no copy.

Bytes model (b = bytes per logit; per-row vectors are O(N) and ignored):

* forward and logprobs read the logits once: N·V·b;
* backward reads them once and writes d(logits) once: 2·N·V·b (rows whose two
  coefficients are both 0, i.e. masked tokens, only write zeros: N·V·b).

No ``[N, V]`` temporary exists in any precision.

Specialisation: τ, ε, β, η, c, V, T and the strides are runtime arguments. Triton
specialises an int argument on "divisible by 16" (tl.divisibility): that is kept for V
and the strides, where it proves rows 16-byte aligned and so allows vector loads (at most
two variants per argument, not one per value), and switched off for T, which only enters
a division.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# ----------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------


@triton.jit
def _row_offset(
    row,  # row index in [0, N)
    T,  # rows per leading index
    stride_b,  # elements between leading indices
    stride_t,  # elements between rows of one leading index
):
    # int64: B·T·V exceeds 2^31 at real sizes.
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    return b * stride_b + t * stride_t


@triton.jit
def _online_softmax_step(
    logits,  # [BLOCK_V] fp32 raw logits, −inf on masked lanes and banned tokens
    m,  # running max of the raw logits
    s,  # running Σ exp(z), z = (logit − m) / τ
    u,  # running Σ exp(z)·z
    inv_temperature,  # 1 / τ
):
    """Fold one block into the running softmax statistics of a row.

    The shift by the max comes before the scale by 1/τ: logit − m is exact for 16-bit
    logits and small near the max, so rounding 1/τ costs almost nothing where p is large.
    u is centred on the max (not Σ e·x), so H = log s − u/s has no cancellation between
    large numbers. −inf entries add 0 to s and u; a still-empty row (m = −inf) shifts by
    0, so −inf − (−inf) never makes a NaN. NaN and +inf logits reach s and propagate.
    """
    m_new = tl.maximum(m, tl.max(logits, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp((m - m_safe) * inv_temperature)
    shift = tl.where(m == float("-inf"), 0.0, (m - m_safe) * inv_temperature)
    z = (logits - m_safe) * inv_temperature
    e = tl.exp(z)
    u = alpha * (u + s * shift) + tl.sum(e * tl.where(logits == float("-inf"), 0.0, z), axis=0)
    s = alpha * s + tl.sum(e, axis=0)
    return m_new, s, u


@triton.jit
def _row_softmax(
    row_ptr,  # pointer to the row's first logit
    target_logit,  # fp32 raw logit of the target
    V,  # vocabulary size
    temperature,  # τ
    inv_temperature,  # 1 / τ
    BLOCK_V: tl.constexpr,  # logits per step
):
    """One streaming pass over a row of x = logits / τ: (lp, lp_err, H, m, log s), m = max x.

    lp + lp_err is the log-prob to about twice fp32 precision: the error-free residuals
    of (y − m)/τ and of the final subtraction, so that the per-token math, which can
    amplify an error in lp (exp(ref − lp) in k3, A·exp(lp − old) in the ratio), starts
    from a better lp than a plain fp32 log_softmax has.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m, s, u = _online_softmax_step(logits, m, s, u, inv_temperature)
    log_s = tl.log(s)
    shifted = target_logit - m  # exact for 16-bit logits
    scaled = tl.div_rn(shifted, temperature)
    scaled_err = tl.fma(-scaled, temperature, shifted) * inv_temperature
    lp = scaled - log_s
    back = lp - scaled  # two-sum of scaled and −log s
    lp_err = (scaled - (lp - back)) + (-log_s - back) + scaled_err
    lp_err = tl.where(tl.abs(lp) < float("inf"), lp_err, 0.0)  # a banned target: lp = −inf, no NaN
    return lp, lp_err, log_s - u / s, m * inv_temperature, log_s


@triton.jit(do_not_specialize=["T"])
def _ppo_forward_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    targets_ptr,  # [N] int32 | int64 ids in [0, V)
    advantages_ptr,  # [N] fp32
    old_logprobs_ptr,  # [N] fp32, read when HAS_OLD
    ref_logprobs_ptr,  # [N] fp32, read when HAS_REF
    logprobs_ptr,  # out [N] fp32: lp = x_y − lse
    entropy_ptr,  # out [N] fp32: H
    row_max_ptr,  # out [N] fp32: m = max x
    log_sum_ptr,  # out [N] fp32: log Σ exp(x − m)
    ratio_ptr,  # out [N] fp32: r
    pg_ptr,  # out [N] fp32: clipped surrogate
    kl_ptr,  # out [N] fp32: KL estimate (0 without HAS_REF)
    loss_ptr,  # out [N] fp32: ℓ = pg + β·kl − η·H
    dlogp_ptr,  # out [N] fp32: g = dℓ/d lp (surrogate and KL parts)
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    temperature,  # τ
    inv_temperature,  # 1 / τ
    ratio_low,  # 1 − ε_low
    ratio_high,  # 1 + ε_high
    dual_clip,  # c, read when HAS_DUAL_CLIP
    kl_coef,  # β
    entropy_coef,  # η
    HAS_OLD: tl.constexpr,  # old log-probs given (else r = 1)
    HAS_REF: tl.constexpr,  # reference log-probs given (else kl = 0)
    KL_ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 k3+
    HAS_DUAL_CLIP: tl.constexpr,  # dual clip on negative advantages
    BLOCK_V: tl.constexpr,  # logits per step
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    # The target logit is loaded before the stream so that its latency overlaps it.
    target = tl.load(targets_ptr + row).to(tl.int64)
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    lp, lp_err, entropy, row_max, log_sum = _row_softmax(row_ptr, target_logit, V, temperature, inv_temperature,
                                                         BLOCK_V)

    adv = tl.load(advantages_ptr + row)
    if HAS_OLD:
        ratio = tl.exp((lp - tl.load(old_logprobs_ptr + row)) + lp_err)
    else:
        ratio = tl.full([], 1.0, tl.float32)
    clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    pg = tl.maximum(-adv * ratio, -adv * clipped)
    inactive = ((adv > 0) & (ratio > ratio_high)) | ((adv < 0) & (ratio < ratio_low))
    if HAS_DUAL_CLIP:
        pg = tl.where(adv < 0, tl.minimum(pg, -dual_clip * adv), pg)
        inactive = inactive | ((adv < 0) & (ratio > dual_clip))
    dlogp = tl.where(inactive, 0.0, -adv * ratio)

    if HAS_REF:
        delta = (tl.load(ref_logprobs_ptr + row) - lp) - lp_err
        if KL_ESTIMATOR == 0:
            kl = -delta
            kl_grad = tl.full([], 1.0, tl.float32)
        elif KL_ESTIMATOR == 1:
            kl = 0.5 * delta * delta
            kl_grad = -delta
        else:
            kl = tl.exp(delta) - delta - 1.0
            if KL_ESTIMATOR == 2:
                kl_grad = 1.0 - tl.exp(delta)
            else:  # k3+: value of k3, gradient of k2
                kl_grad = -delta
        # β = 0 adds nothing, not even a NaN from an overflowing k3 gradient.
        dlogp += tl.where(kl_coef != 0.0, kl_coef * kl_grad, 0.0)
    else:
        kl = tl.zeros([], tl.float32)
    loss = pg + kl_coef * kl - entropy_coef * entropy

    tl.store(logprobs_ptr + row, lp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(row_max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, log_sum)
    tl.store(ratio_ptr + row, ratio)
    tl.store(pg_ptr + row, pg)
    tl.store(kl_ptr + row, kl)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogp_ptr + row, dlogp)


@triton.jit(do_not_specialize=["T"])
def _ppo_backward_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    grad_ptr,  # out [B, T, V] logits dtype, stride 1 on V; may be logits_ptr
    targets_ptr,  # [N] int32 | int64 ids in [0, V), or −1: no one-hot term (vocab shard)
    row_max_ptr,  # [N] fp32 m from the forward
    log_sum_ptr,  # [N] fp32 log s from the forward
    entropy_ptr,  # [N] fp32 H from the forward
    coef_logprob_ptr,  # [N] fp32 c_lp = d(loss)/d lp
    coef_entropy_ptr,  # [N] fp32 c_H = η · weight · upstream grad
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    grad_stride_b,  # grad stride of B, elements
    grad_stride_t,  # grad stride of T, elements
    inv_temperature,  # 1 / τ
    BLOCK_V: tl.constexpr,  # logits per program
):
    """d(loss)/d(logits_j) = (1/τ)·[c_lp·(1[j=y] − p_j) + c_H·p_j·(log p_j + H)]."""
    row = tl.program_id(0)  # rows on axis 0: axes 1 and 2 stop at 65535
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    coef_logprob = tl.load(coef_logprob_ptr + row)
    coef_entropy = tl.load(coef_entropy_ptr + row)
    # A row with both coefficients 0 (a masked token) has a zero gradient: skip its reads.
    live = (coef_logprob != 0.0) | (coef_entropy != 0.0)
    read_end = tl.where(live, V, 0)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    x = tl.load(row_ptr + cols, mask=cols < read_end, other=0.0).to(tl.float32) * inv_temperature
    target = tl.load(targets_ptr + row).to(tl.int64)
    log_p = (x - tl.load(row_max_ptr + row)) - tl.load(log_sum_ptr + row)  # the max first: no digits lost
    p = tl.exp(log_p)
    grad = coef_logprob * (tl.where(cols == target, 1.0, 0.0) - p)
    # p = 0 (a banned token) contributes 0, not 0·(−inf).
    entropy_term = tl.where(p > 0.0, p * (log_p + tl.load(entropy_ptr + row)), 0.0)
    grad = (grad + coef_entropy * entropy_term) * inv_temperature
    grad = tl.where(live, grad, 0.0)
    grad_row = grad_ptr + _row_offset(row, T, grad_stride_b, grad_stride_t)
    tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit(do_not_specialize=["T"])
def _logprobs_kernel(
    logits_ptr,  # [B, T, V] fp32 | bf16 | fp16, stride 1 on V
    targets_ptr,  # [N] int32 | int64 ids in [0, V)
    logprobs_ptr,  # out [N] fp32
    entropy_ptr,  # out [N] fp32, written when HAS_ENTROPY
    row_max_ptr,  # out [N] fp32: m = max x
    log_sum_ptr,  # out [N] fp32: log Σ exp(x − m)
    V,  # vocabulary size
    T,  # rows per leading index
    stride_b,  # logits stride of B, elements
    stride_t,  # logits stride of T, elements
    temperature,  # τ
    inv_temperature,  # 1 / τ
    HAS_ENTROPY: tl.constexpr,  # also write H
    BLOCK_V: tl.constexpr,  # logits per step
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    target = tl.load(targets_ptr + row).to(tl.int64)
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    lp, _, entropy, row_max, log_sum = _row_softmax(row_ptr, target_logit, V, temperature, inv_temperature, BLOCK_V)
    tl.store(logprobs_ptr + row, lp)
    tl.store(row_max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, log_sum)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


# ----------------------------------------------------------------------------------
# Launchers: no allocation, no autograd; the caller owns every buffer.
# ----------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    block_v: int  # logits per step of the streaming kernels (forward, logprobs)
    num_warps: int
    bwd_block_v: int  # logits per backward program
    bwd_num_warps: int


_CHUNK_BYTES = 8192  # per step/program: 256 threads × 32 B (two 16-byte loads each)


def launch_config(vocab: int, dtype: torch.dtype) -> LaunchConfig:
    """BLOCK_V and num_warps for a vocabulary size and logits dtype.

    A chunk of 8 KiB keeps 8 warps with two 16-byte loads per thread each and leaves
    registers for several programs per SM, which hide the load latency; small
    vocabularies get one power-of-two block and fewer warps. BLOCK_V only changes at
    powers of two below the chunk size, so most new V reuse a compiled kernel.
    """
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    block = min(triton.next_power_of_2(vocab), _CHUNK_BYTES // elem_bytes)
    block = max(block, 128)
    warps = max(1, min(8, block * elem_bytes // 1024))
    return LaunchConfig(block, warps, block, warps)


def _rows(logits: torch.Tensor):
    batch, seq, vocab = logits.shape
    return batch * seq, seq, vocab


def ppo_forward(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: Optional[torch.Tensor],  # [N] fp32
    ref_logprobs: Optional[torch.Tensor],  # [N] fp32
    outputs,  # 9 fp32 [N] buffers in TokenResults order
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
    cfg = config or launch_config(vocab, logits.dtype)
    has_old, has_ref = old_logprobs is not None, ref_logprobs is not None
    lp, entropy, row_max, log_sum, ratio, pg, kl, loss, dlogp = outputs
    wrap_triton(_ppo_forward_kernel)[(rows,)](
        # data
        logits, targets, advantages,
        old_logprobs if has_old else advantages,  # never read: a valid pointer
        ref_logprobs if has_ref else advantages,
        lp, entropy, row_max, log_sum, ratio, pg, kl, loss, dlogp,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        temperature, 1.0 / temperature, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
        # switches
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        KL_ESTIMATOR=kl_estimator if has_ref else 0,  # one variant when there is no KL
        HAS_DUAL_CLIP=dual_clip > 0.0,
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
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype)
    grid = (rows, triton.cdiv(vocab, cfg.bwd_block_v))
    wrap_triton(_ppo_backward_kernel)[grid](
        # data
        logits, out, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        # constants
        1.0 / temperature,
        BLOCK_V=cfg.bwd_block_v,
        num_warps=cfg.bwd_num_warps,
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
    cfg = config or launch_config(vocab, logits.dtype)
    has_entropy = out_entropy is not None
    wrap_triton(_logprobs_kernel)[(rows,)](
        # data
        logits, targets, out_logprobs,
        out_entropy if has_entropy else out_logprobs,  # never written: a valid pointer
        out_row_max, out_log_sum,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        temperature, 1.0 / temperature,
        HAS_ENTROPY=has_entropy,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip
