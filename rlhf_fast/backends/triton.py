"""The Triton backend as a :class:`~rlhf_fast.backends.RowOps`, registered as torch ops.

Each op declared in :mod:`.ops` is registered in namespace ``rlhf_fast_triton`` with its launcher
(:mod:`rlhf_fast.kernels.ppo_loss`, :attr:`~rlhf_fast.backends.ops.Op.launcher`) as its body: the body
checks the buffer the op writes, allocates the outputs (the op's fake) and launches; no autograd here
(that is :mod:`rlhf_fast.loss.autograd`). With CUDA the ops are ``torch.library.triton_op``s, so
``torch.compile`` traces through them to the kernels without a graph break. Under ``TRITON_INTERPRET=1``
the kernels are ``InterpretedFunction``s, which ``wrap_triton`` cannot trace (they carry no JIT metadata);
there the ops are opaque ``custom_op``s with the allocation-only fake, which still compile with
``fullgraph=True``.

Loaded lazily by :func:`rlhf_fast.backends.load_ops`; importing it imports triton.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..kernels import ppo_loss as kernels
from . import ops, triton_interpret
from .rows import RowParams, TokenResults, check_gradient_out, refuse_overlapping

_NAMESPACE = "rlhf_fast_triton"
_INTERPRETED = triton_interpret()


def _on_device(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _register(op: ops.Op):
    """Op ``rlhf_fast_triton::<name>``: check what it writes, allocate its outputs, launch."""
    launch = getattr(kernels, op.launcher)

    def body(*args, **kwargs):
        call = op.bind(*args, **kwargs)
        if op.writes == "out":
            check_gradient_out(call.logits, call.out)
        elif op.writes == "logits":
            refuse_overlapping(call.logits)
        outputs = op.fake(*args, **kwargs)
        with _on_device(call.logits):
            launch(call, outputs or ())
        return outputs

    qualname, impl = f"{_NAMESPACE}::{op.name}", op.function(body)
    if _INTERPRETED:  # InterpretedFunctions carry no JIT metadata: an opaque op with the fake
        registered = torch.library.custom_op(qualname, impl, mutates_args=op.mutates)
        registered.register_fake(op.function(op.fake))
        return registered
    return torch.library.triton_op(qualname, impl, mutates_args=op.mutates)


_OPS = {op: _register(op) for op in ops.TRITON_OPS}


def forward_with_grad(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams, weights: Tensor,
                      out: Tensor) -> TokenResults:  # fmt: skip
    """:func:`forward`, and d(Σ w·ℓ)/d(logits) ``[B, T, V]`` into ``out`` for upstream gradient 1.

    ``weights`` ``[N]`` fp32 are the per-token aggregation weights w (loss = Σ w·ℓ); ``out``
    may be ``logits`` itself. Where a row fits in registers (bf16 / fp32 rows of at most
    64 KiB starting on 16-byte boundaries: ``kernels.forward_grad_applies``) one kernel reads
    the logits once and writes the gradient, 2·N·V·b bytes; otherwise the forward and the
    backward kernels run, 3·N·V·b bytes, with the same results.
    """
    inplace = out is logits
    if inplace:
        refuse_overlapping(logits)
    if kernels.forward_grad_applies(logits, out):
        op = ops.PPO_FORWARD_GRAD_INPLACE if inplace else ops.PPO_FORWARD_GRAD
        values = ops.token_inputs(logits, targets, advantages, old_logprobs, ref_logprobs, params)
        return TokenResults(*_OPS[op](*op.positional(weights=weights, out=out, **values)))
    results = forward(logits, targets, advantages, old_logprobs, ref_logprobs, params)
    weighted = weights != 0  # a masked token's coefficients are 0, not 0·NaN
    coef_logprob = torch.where(weighted, results.dlogp * weights * torch.exp(results.log_scale), 0.0)
    coef_entropy = torch.where(weighted, weights * params.entropy_coef, 0.0)
    backward(logits, targets, results.row_max, results.log_sum, results.entropy, coef_logprob, coef_entropy,
             params.temperature, out)
    return results


ROW_OPS = ops.row_ops(_OPS.__getitem__, forward_with_grad)
forward, backward, logprobs = ROW_OPS.forward, ROW_OPS.backward, ROW_OPS.logprobs
