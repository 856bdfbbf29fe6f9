"""The Triton backend as a :class:`~rlhf_fast.backends.RowOps`, registered as torch ops.

Each kernel launch sits in a ``torch.library`` op (namespace ``rlhf_fast_triton``) that
allocates its outputs and calls a launcher of :mod:`rlhf_fast.kernels.ppo_loss`; no
autograd here (that is :mod:`rlhf_fast.loss.autograd`). With CUDA the ops are
``torch.library.triton_op``s, so ``torch.compile`` traces through them to the kernels
without a graph break. Under ``TRITON_INTERPRET=1`` the kernels are
``InterpretedFunction``s, which ``wrap_triton`` cannot trace (they carry no JIT
metadata); there the ops are opaque ``custom_op``s with an allocation-only fake, which
still compile with ``fullgraph=True``.

Loaded lazily by :func:`rlhf_fast.backends.load_ops`; importing it imports triton.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..kernels import ppo_loss as kernels
from . import triton_interpret
from .rows import RowOps, RowParams, TokenResults

_NAMESPACE = "rlhf_fast_triton"
_INTERPRETED = triton_interpret()


def _register(name: str, mutates_args: Tuple[str, ...], fake: Callable) -> Callable:
    """Decorator: the launch function as op ``rlhf_fast_triton::name`` (see module docstring)."""

    def register(impl: Callable):
        qualname = f"{_NAMESPACE}::{name}"
        if _INTERPRETED:
            op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(qualname, impl, mutates_args=mutates_args)

    return register


def _on_device(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _row_vector(targets: Tensor) -> Tensor:
    return torch.empty(targets.shape, dtype=torch.float32, device=targets.device)


# ----------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------


def _forward_fake(logits, targets, *args) -> Tuple[Tensor, ...]:
    return tuple(_row_vector(targets) for _ in TokenResults._fields)


@_register("ppo_forward", mutates_args=(), fake=_forward_fake)
def _forward_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N]
    advantages: Tensor,  # [N] fp32
    old_logprobs: Optional[Tensor],  # [N] fp32
    ref_logprobs: Optional[Tensor],  # [N] fp32
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    outputs = _forward_fake(logits, targets)
    with _on_device(logits):
        kernels.ppo_forward(
            logits, targets, advantages, old_logprobs, ref_logprobs, outputs,
            ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator, entropy_coef, temperature,
        )  # fmt: skip
    return outputs


def _no_output(*args) -> None:
    return None


@_register("ppo_backward", mutates_args=("out",), fake=_no_output)
def _backward_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N]
    lse: Tensor,  # [N] fp32
    entropy: Tensor,  # [N] fp32
    coef_logprob: Tensor,  # [N] fp32
    coef_entropy: Tensor,  # [N] fp32
    temperature: float,
    out: Tensor,  # [B, T, V], written
) -> None:
    with _on_device(logits):
        kernels.ppo_backward(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature, out)


# A separate op for the in-place case: one op whose two arguments alias while one of
# them is mutated is outside what torch.library ops may declare.
@_register("ppo_backward_inplace", mutates_args=("logits",), fake=_no_output)
def _backward_inplace_op(
    logits: Tensor,  # [B, T, V], overwritten by d(loss)/d(logits)
    targets: Tensor,  # [N]
    lse: Tensor,  # [N] fp32
    entropy: Tensor,  # [N] fp32
    coef_logprob: Tensor,  # [N] fp32
    coef_entropy: Tensor,  # [N] fp32
    temperature: float,
) -> None:
    with _on_device(logits):
        kernels.ppo_backward(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature, logits)


def _logprobs_fake(logits, targets, temperature, with_entropy) -> Tuple[Tensor, Tensor]:
    entropy = _row_vector(targets) if with_entropy else targets.new_empty(0, dtype=torch.float32)
    return _row_vector(targets), entropy


@_register("logprobs", mutates_args=(), fake=_logprobs_fake)
def _logprobs_op(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N]
    temperature: float,
    with_entropy: bool,
) -> Tuple[Tensor, Tensor]:
    lp, entropy = _logprobs_fake(logits, targets, temperature, with_entropy)
    with _on_device(logits):
        kernels.logprobs(logits, targets, lp, entropy if with_entropy else None, temperature)
    return lp, entropy


# ----------------------------------------------------------------------------------
# RowOps
# ----------------------------------------------------------------------------------


def forward(
    logits: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    cfg: RowParams,
) -> TokenResults:
    """Per-token results for logits ``[B, T, V]`` and per-row vectors ``[N]``."""
    outputs = _forward_op(
        logits, targets, advantages,
        old_logprobs if cfg.has_old else None,
        ref_logprobs if cfg.has_ref else None,
        1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high, cfg.dual_clip,
        cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef, cfg.temperature,
    )  # fmt: skip
    return TokenResults(*outputs)


def backward(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    coef_logprob: Tensor,
    coef_entropy: Tensor,
    temperature: float,
    out: Tensor,
) -> None:
    """Write d(loss)/d(logits) ``[B, T, V]`` into ``out`` (which may be ``logits`` itself)."""
    # Identity, not data_ptr: it also holds for the fake tensors of torch.compile.
    if out is logits:
        _backward_inplace_op(logits, targets, lse, entropy, coef_logprob, coef_entropy, float(temperature))
    else:
        _backward_op(logits, targets, lse, entropy, coef_logprob, coef_entropy, float(temperature), out)


def logprobs(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """Log-probs ``[N]`` (and entropy ``[N]`` or None) without a graph."""
    lp, entropy = _logprobs_op(logits, targets, float(temperature), bool(with_entropy))
    return lp, (entropy if with_entropy else None)


ROW_OPS = RowOps(forward, backward, logprobs)
