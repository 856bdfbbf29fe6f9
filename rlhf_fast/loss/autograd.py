"""The autograd Functions around any row backend (Triton, C++, the reference as a row backend).

* :class:`FusedPPOLoss` — the plain PPO loss in one pass: the backend's forward gives the
  per-token results and g = dℓ/d lp (ℓ and g times e^−s, s the token's log scale); the loss is
  Σ w·ℓ with the aggregation weights w of
  :func:`rlhf_fast.loss.aggregation.aggregation_weights`, summed without overflowing before the
  weights (:func:`~rlhf_fast.loss.aggregation.scaled_sum`). Backward: the backend recomputes p
  from the logits and writes (1/τ)·[c_lp·(1[j=y] − p_j) + c_H·p_j·(log p_j + H)] with
  c_lp = g·w·grad and c_H = η·w·grad, into a new buffer or, with ``inplace``, into the logits.
  With ``grad_in_forward`` and a backend that can (``RowOps.forward_with_grad``), one kernel
  reads each row once and writes d(loss)/d(logits) for an upstream gradient of 1 already in the
  forward (2·N·V·b bytes instead of 3·N·V·b); the backward then only scales it when the upstream
  gradient is not 1.
* :class:`RowLogprobs` — differentiable per-token log-probs and entropy: forward, the
  backend's statistics pass; backward, the same kernel with c_lp = dL/d lp and c_H = −dL/dH for
  any function L the caller (or a policy-loss variant) wrote on them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends.rows import RowOps, RowParams, may_overlap_itself, storage_span
from .aggregation import scaled_sum


def _gradient_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    """d(logits): the logits themselves, or a new buffer in which every element owns its memory.

    It copies the logits' strides when those address each element once (rows then keep the logits'
    16-byte phase, so an odd vocabulary keeps vector stores) and span at most twice the elements (that
    phase is worth no more memory than the gradient itself); otherwise, an expanded tensor for one, it is
    contiguous (autograd sums the gradient of an expanded view back onto its source).
    """
    if inplace:
        return logits
    if may_overlap_itself(logits) or storage_span(logits) > 2 * logits.numel():
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)


class FusedPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # [B, T, V], stride 1 on V
        targets: torch.Tensor,  # [N] sanitised ids
        valid: torch.Tensor,  # [N] bool
        weights: torch.Tensor,  # [N] fp32 aggregation weights (0 where masked)
        advantages: torch.Tensor,  # [N] fp32
        old_logprobs: Optional[torch.Tensor],  # [N] fp32
        ref_logprobs: Optional[torch.Tensor],  # [N] fp32
        params: RowParams,
        ops: RowOps,
        inplace_backward: bool,
        grad_in_forward: bool = False,
    ):
        ctx.grad = None
        if grad_in_forward and ops.forward_with_grad is not None and ctx.needs_input_grad[0]:
            ctx.grad = _gradient_buffer(logits, inplace_backward)
            res = ops.forward_with_grad(logits, targets, advantages, old_logprobs, ref_logprobs, params, weights,
                                        ctx.grad)
        else:
            res = ops.forward(logits, targets, advantages, old_logprobs, ref_logprobs, params)
        zeros = torch.zeros_like(weights)
        token_loss = torch.where(valid, res.loss, zeros)
        log_scale = torch.where(valid, res.log_scale, zeros)
        loss = scaled_sum(weights * token_loss, log_scale)
        # Masked rows may hold NaN in g (a banned placeholder target): keep them out of the backward.
        weighted_dlogp = torch.where(valid, res.dlogp * weights * torch.exp(log_scale), zeros)
        ctx.save_for_backward(logits, targets, res.row_max, res.log_sum, res.entropy, weighted_dlogp, weights,
                              res.outside)
        ctx.params, ctx.ops, ctx.inplace_backward = params, ops, inplace_backward
        outputs = (res.logprobs, res.entropy, res.ratio, res.pg, res.kl, res.log_scale, res.kl_log_scale)
        ctx.mark_non_differentiable(*outputs)
        return (loss,) + outputs

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.grad is not None:  # formed in the forward for an upstream gradient of 1
            grad, ctx.grad = ctx.grad, None
            if torch.compiler.is_compiling() or bool(grad_loss != 1):  # one scalar sync outside compile
                grad = grad.mul_(grad_loss)
            return (grad,) + (None,) * 10
        logits, targets, row_max, log_sum, entropy, weighted_dlogp, weights, outside = ctx.saved_tensors
        params: RowParams = ctx.params
        coef_logprob = weighted_dlogp * grad_loss
        coef_entropy = (params.entropy_coef * grad_loss) * weights
        out = _gradient_buffer(logits, ctx.inplace_backward)
        ctx.ops.backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, params.temperature,
                         out, outside)
        return (out,) + (None,) * 10


class RowLogprobs(torch.autograd.Function):
    """(lp, H) ``[N]`` of logits ``[B, T, V]``, differentiable through the backend's fused backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, ops: RowOps,
                inplace_backward: bool):
        stats = ops.logprobs(logits, targets, temperature, True)
        ctx.save_for_backward(logits, targets, stats.row_max, stats.log_sum, stats.entropy, stats.outside)
        ctx.temperature, ctx.ops, ctx.inplace_backward = temperature, ops, inplace_backward
        return stats.logprobs, stats.entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, row_max, log_sum, entropy, outside = ctx.saved_tensors
        zeros = torch.zeros_like(entropy)
        coef_logprob = zeros if grad_logprobs is None else grad_logprobs.to(torch.float32).contiguous()
        # dH/dx_j = −p_j·(log p_j + H): the kernel's entropy coefficient is −dL/dH
        coef_entropy = zeros if grad_entropy is None else (-grad_entropy).to(torch.float32).contiguous()
        out = _gradient_buffer(logits, ctx.inplace_backward)
        ctx.ops.backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, ctx.temperature, out,
                         outside)
        return out, None, None, None, None
