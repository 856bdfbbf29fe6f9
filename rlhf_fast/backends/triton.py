"""The Triton backend as a :class:`~rlhf_fast.backends.RowOps`, registered as torch ops.

Each kernel launch sits in a ``torch.library`` op (namespace ``rlhf_fast_triton``; schemas
and fakes in :mod:`.ops`) that allocates its outputs and calls a launcher of
:mod:`rlhf_fast.kernels.ppo_loss`; no autograd here (that is :mod:`rlhf_fast.loss.autograd`).
With CUDA the ops are ``torch.library.triton_op``s, so ``torch.compile`` traces through them
to the kernels without a graph break. Under ``TRITON_INTERPRET=1`` the kernels are
``InterpretedFunction``s, which ``wrap_triton`` cannot trace (they carry no JIT metadata);
there the ops are opaque ``custom_op``s with an allocation-only fake, which still compile
with ``fullgraph=True``.

Loaded lazily by :func:`rlhf_fast.backends.load_ops`; importing it imports triton.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..kernels import ppo_loss as kernels
from . import ops, triton_interpret
from .rows import RowOps, RowParams, RowStats, TokenResults, check_gradient_out, refuse_overlapping

_NAMESPACE = "rlhf_fast_triton"
_INTERPRETED = triton_interpret()


def _op(stub):
    return ops.triton_op(_NAMESPACE, stub, _INTERPRETED)


def _on_device(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@_op(ops.ppo_forward)
def _forward_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N] int32 | int64, sanitised ids
    advantages: Tensor,  # [N] fp32
    old_logprobs: Optional[Tensor],  # [N] fp32, or None: ratio 1
    ref_logprobs: Optional[Tensor],  # [N] fp32, or None: no KL
    ratio_low: float,  # 1 − ε_low
    ratio_high: float,  # 1 + ε_high
    dual_clip: float,  # c, 0 = off
    kl_coef: float,  # β
    kl_estimator: int,  # 0 k1, 1 k2, 2 k3, 3 k3+
    entropy_coef: float,  # η
    temperature: float,  # τ
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    outputs = ops.ppo_forward(logits, targets, advantages, old_logprobs, ref_logprobs, ratio_low, ratio_high,
                              dual_clip, kl_coef, kl_estimator, entropy_coef, temperature)
    with _on_device(logits):
        kernels.ppo_forward(
            logits, targets, advantages, old_logprobs, ref_logprobs, outputs,
            ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef, temperature,
        )  # fmt: skip
    return outputs


@_op(ops.ppo_backward)
def _backward_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N] ids, or −1: no one-hot term (the target is on another vocabulary shard)
    row_max: Tensor,  # [N] fp32 m
    log_sum: Tensor,  # [N] fp32 log s
    entropy: Tensor,  # [N] fp32 H
    coef_logprob: Tensor,  # [N] fp32 c_lp = d(loss)/d lp
    coef_entropy: Tensor,  # [N] fp32 c_H
    temperature: float,  # τ
    out: Tensor,  # [B, T, V] logits' dtype, written
    outside: Optional[Tensor] = None,  # [N] fp32 probability on other vocabulary shards (None: whole rows)
) -> None:
    check_gradient_out(logits, out)
    with _on_device(logits):
        kernels.ppo_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature,
                             out, outside)


@_op(ops.ppo_backward_inplace)
def _backward_inplace_op(
    logits: Tensor,  # [B, T, V], overwritten by d(loss)/d(logits)
    targets: Tensor,
    row_max: Tensor,
    log_sum: Tensor,
    entropy: Tensor,
    coef_logprob: Tensor,
    coef_entropy: Tensor,
    temperature: float,
    outside: Optional[Tensor] = None,
) -> None:
    refuse_overlapping(logits)
    with _on_device(logits):
        kernels.ppo_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature,
                             logits, outside)


@_op(ops.logprobs)
def _logprobs_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N]
    temperature: float,  # τ
    with_entropy: bool,  # also compute H
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    lp, entropy, row_max, log_sum = ops.logprobs(logits, targets, temperature, with_entropy)
    with _on_device(logits):
        kernels.logprobs(logits, targets, lp, entropy if with_entropy else None, row_max, log_sum, temperature)
    return lp, entropy, row_max, log_sum


@_op(ops.ppo_forward_grad)
def _forward_grad_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N] int32 | int64, sanitised ids
    advantages: Tensor,  # [N] fp32
    old_logprobs: Optional[Tensor],  # [N] fp32, or None: ratio 1
    ref_logprobs: Optional[Tensor],  # [N] fp32, or None: no KL
    weights: Tensor,  # [N] fp32 aggregation weights w: loss = Σ w·ℓ
    ratio_low: float,  # 1 − ε_low
    ratio_high: float,  # 1 + ε_high
    dual_clip: float,  # c, 0 = off
    kl_coef: float,  # β
    kl_estimator: int,  # 0 k1, 1 k2, 2 k3, 3 k3+
    entropy_coef: float,  # η
    temperature: float,  # τ
    out: Tensor,  # [B, T, V] logits' dtype, written: d(Σ w·ℓ)/d(logits)
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_gradient_out(logits, out)
    outputs = ops.ppo_forward_grad(logits, targets, advantages, old_logprobs, ref_logprobs, weights, ratio_low,
                                   ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef, temperature, out)
    with _on_device(logits):
        kernels.ppo_forward_grad(
            logits, targets, advantages, old_logprobs, ref_logprobs, weights, outputs, out,
            ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef, temperature,
        )  # fmt: skip
    return outputs


@_op(ops.ppo_forward_grad_inplace)
def _forward_grad_inplace_op(
    logits: Tensor,  # [B, T, V], overwritten by d(Σ w·ℓ)/d(logits)
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    weights: Tensor,
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    refuse_overlapping(logits)
    outputs = ops.ppo_forward_grad_inplace(logits, targets, advantages, old_logprobs, ref_logprobs, weights,
                                           ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef,
                                           temperature)
    with _on_device(logits):
        kernels.ppo_forward_grad(
            logits, targets, advantages, old_logprobs, ref_logprobs, weights, outputs, logits,
            ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef, temperature,
        )  # fmt: skip
    return outputs


# ----------------------------------------------------------------------------------
# RowOps
# ----------------------------------------------------------------------------------


def _per_token(params: RowParams) -> tuple:
    """The per-token settings in the ops' argument order (ratio_low … temperature)."""
    return (1.0 - params.clip_eps_low, 1.0 + params.clip_eps_high, params.dual_clip, params.kl_coef,
            params.kl_estimator, params.entropy_coef, params.temperature)  # fmt: skip


def forward(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams) -> TokenResults:
    """Per-token results for logits ``[B, T, V]`` and per-row vectors ``[N]``."""
    outputs = _forward_op(
        logits, targets, advantages,
        old_logprobs if params.has_old else None,
        ref_logprobs if params.has_ref else None,
        *_per_token(params),
    )  # fmt: skip
    return TokenResults(*outputs)


def forward_with_grad(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams, weights: Tensor,
                      out: Tensor) -> TokenResults:  # fmt: skip
    """:func:`forward`, and d(Σ w·ℓ)/d(logits) ``[B, T, V]`` into ``out`` for upstream gradient 1.

    ``weights`` ``[N]`` fp32 are the per-token aggregation weights w (loss = Σ w·ℓ); ``out``
    may be ``logits`` itself. Where a row fits in registers (bf16 / fp32 rows of at most
    64 KiB starting on 16-byte boundaries: ``kernels.forward_grad_applies``) one kernel reads
    the logits once and writes the gradient, 2·N·V·b bytes; otherwise the forward and the
    backward kernels run, 3·N·V·b bytes, with the same results.
    """
    old = old_logprobs if params.has_old else None
    ref = ref_logprobs if params.has_ref else None
    inplace = out is logits
    if inplace:
        refuse_overlapping(logits)
    if kernels.forward_grad_applies(logits, out):
        if inplace:
            outputs = _forward_grad_inplace_op(logits, targets, advantages, old, ref, weights, *_per_token(params))
        else:
            outputs = _forward_grad_op(logits, targets, advantages, old, ref, weights, *_per_token(params), out)
        return TokenResults(*outputs)
    results = forward(logits, targets, advantages, old, ref, params)
    weighted = weights != 0  # a masked token's coefficients are 0, not 0·NaN
    coef_logprob = torch.where(weighted, results.dlogp * weights * torch.exp(results.log_scale), 0.0)
    coef_entropy = torch.where(weighted, weights * params.entropy_coef, 0.0)
    backward(logits, targets, results.row_max, results.log_sum, results.entropy, coef_logprob, coef_entropy,
             params.temperature, out)
    return results


def backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out,
             outside=None) -> None:
    """Write d(loss)/d(logits) ``[B, T, V]`` into ``out`` (which may be ``logits`` itself)."""
    # Identity, not data_ptr: it also holds for the fake tensors of torch.compile.
    if out is logits:
        refuse_overlapping(logits)
        _backward_inplace_op(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy,
                             float(temperature), outside)
    else:
        _backward_op(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, float(temperature),
                     out, outside)


def logprobs(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool) -> RowStats:
    """Log-probs ``[N]`` (and entropy ``[N]`` or None) and the row statistics, without a graph."""
    lp, entropy, row_max, log_sum = _logprobs_op(logits, targets, float(temperature), bool(with_entropy))
    return RowStats(lp, entropy if with_entropy else None, row_max, log_sum)


ROW_OPS = RowOps(forward, backward, logprobs, forward_with_grad)
