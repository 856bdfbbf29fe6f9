"""The autograd Function shared by every fused row backend (Triton, C++, and the reference as a row backend).

Forward: one backend pass gives the per-token results and g = dℓ/d lp; the loss is
Σ w·ℓ with the aggregation weights w of :func:`rlhf_fast.loss.aggregation.aggregation_weights`.
Backward: the backend recomputes p from the logits and writes
(1/τ)·[c_lp·(1[j=y] − p_j) + c_H·p_j·(log p_j + H)] with c_lp = g·w·grad and
c_H = η·w·grad, into a new buffer or, with ``inplace``, into the logits themselves.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends.rows import RowOps, RowParams


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
    ):
        res = ops.forward(logits, targets, advantages, old_logprobs, ref_logprobs, params)
        token_loss = torch.where(valid, res.loss, torch.zeros_like(res.loss))
        loss = (weights * token_loss).sum()
        # Masked rows may hold NaN in g (a banned placeholder target): keep them out of the backward.
        weighted_dlogp = torch.where(valid, res.dlogp * weights, torch.zeros_like(weights))
        ctx.save_for_backward(logits, targets, res.row_max, res.log_sum, res.entropy, weighted_dlogp, weights)
        ctx.params, ctx.ops, ctx.inplace_backward = params, ops, inplace_backward
        outputs = (res.logprobs, res.entropy, res.ratio, res.pg, res.kl)
        ctx.mark_non_differentiable(*outputs)
        return (loss,) + outputs

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, targets, row_max, log_sum, entropy, weighted_dlogp, weights = ctx.saved_tensors
        params: RowParams = ctx.params
        coef_logprob = weighted_dlogp * grad_loss
        coef_entropy = (params.entropy_coef * grad_loss) * weights
        if ctx.inplace_backward:
            out = logits
        else:
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        ctx.ops.backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, params.temperature,
                         out)
        return (out,) + (None,) * 9
