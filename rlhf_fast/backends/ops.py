"""Every torch op of the fused backends, in one place: each schema is a typed stub whose body is
its fake (an allocation-only implementation that ``torch.compile`` traces with).

The same ops, with the same argument names, exist in two namespaces:

* ``rlhf_fast`` — the C++ CPU kernels (``csrc/``): :func:`define_cpp_ops` defines the schemas
  here and registers the fakes; the extension registers only implementations;
* ``rlhf_fast_triton`` — the Triton kernels: :func:`triton_op` checks that an implementation
  has exactly the stub's signature and registers it (a ``triton_op`` on CUDA, an opaque
  ``custom_op`` under the interpreter) with the stub as its fake.

Shapes: logits ``[B, T, V]`` (stride 1 on V), targets and every per-row vector ``[N = B·T]``,
outputs fp32 ``[N]`` (the forward's in :class:`~rlhf_fast.backends.rows.TokenResults` order: pg, loss and
dlogp times e^−log_scale, kl times e^−kl_log_scale). ``ratio_low`` = 1 − ε_low, ``ratio_high`` = 1 + ε_high,
``dual_clip`` = c (0 = off), ``kl_estimator`` 0..3 = k1, k2, k3, k3+. The math is the row contract of
:class:`~rlhf_fast.backends.rows.RowOps`.
"""

from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .rows import KERNEL_OUTPUTS


def _rows(logits: Tensor) -> int:
    return logits.shape[0] * logits.shape[1]


def _row_vector(logits: Tensor, rows: Optional[int] = None) -> Tensor:
    return logits.new_empty((_rows(logits) if rows is None else rows,), dtype=torch.float32)


# ----------------------------------------------------------------------------------
# The ops of both backends: schema (the signature) and fake (the body).
# ----------------------------------------------------------------------------------


def ppo_forward(
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
    """One pass per row → (logprobs, entropy, row_max, log_sum, ratio, pg, kl, loss, dlogp, log_scale,
    kl_log_scale)."""
    return tuple(_row_vector(logits) for _ in range(KERNEL_OUTPUTS))


def ppo_backward(
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
    """Writes d(loss)/d(logits) into ``out``."""
    return None


def ppo_backward_inplace(
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
    """:func:`ppo_backward` into the logits' own memory (one op whose two arguments alias while one is
    mutated is outside what torch.library ops may declare, hence a second op)."""
    return None


def logprobs(
    logits: Tensor,  # [B, T, V]
    targets: Tensor,  # [N]
    temperature: float,  # τ
    with_entropy: bool,  # also compute H
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, entropy (empty without with_entropy), row_max, log_sum)."""
    return _row_vector(logits), _row_vector(logits, None if with_entropy else 0), _row_vector(logits), \
        _row_vector(logits)


OPS: Tuple[Tuple[Callable, Tuple[str, ...]], ...] = (
    (ppo_forward, ()),
    (ppo_backward, ("out",)),
    (ppo_backward_inplace, ("logits",)),
    (logprobs, ()),
)
"""Every kernel op with the arguments it mutates."""

# ----------------------------------------------------------------------------------
# Triton-only ops: the gradient computed in the forward (one read of the logits).
# ----------------------------------------------------------------------------------


def ppo_forward_grad(
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
    """:func:`ppo_forward`'s outputs, and the gradient of Σ w·ℓ (upstream gradient 1) into ``out``."""
    return tuple(_row_vector(logits) for _ in range(KERNEL_OUTPUTS))


def ppo_forward_grad_inplace(
    logits: Tensor,  # [B, T, V], overwritten by d(Σ w·ℓ)/d(logits) once each row is read
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
    """:func:`ppo_forward_grad` into the logits' own memory (see :func:`ppo_backward_inplace`)."""
    return tuple(_row_vector(logits) for _ in range(KERNEL_OUTPUTS))


TRITON_OPS: Tuple[Tuple[Callable, Tuple[str, ...]], ...] = (
    (ppo_forward_grad, ("out",)),
    (ppo_forward_grad_inplace, ("logits",)),
)
"""Ops only the Triton backend has, with the arguments they mutate."""

# ----------------------------------------------------------------------------------
# C++-only diagnostics (no tensors: nothing to trace, no fake).
# ----------------------------------------------------------------------------------

CPP_DIAGNOSTICS = (
    "cpu_capability() -> str",  # the kernel build that runs here: "AVX512", "AVX2" or "DEFAULT"
    "runnable_builds() -> str[]",  # the builds this CPU can execute
    "choose_kernel_build(str aten_capability, str[] runnable) -> str",  # the choice rule, for tests
)


def define_cpp_ops(namespace: str = "rlhf_fast") -> None:
    """Define every op's schema and fake in ``namespace`` (before the C++ extension loads)."""
    for stub, mutates in OPS:
        qualname = f"{namespace}::{stub.__name__}"
        torch.library.define(qualname, torch.library.infer_schema(stub, mutates_args=mutates))
        torch.library.register_fake(qualname)(stub)
    for schema in CPP_DIAGNOSTICS:
        torch.library.define(f"{namespace}::{schema.split('(')[0]}", "(" + schema.split("(", 1)[1])


def check_signature(impl: Callable, stub: Callable) -> None:
    """An implementation must take exactly the stub's arguments (names, order, types)."""
    if inspect.signature(impl) != inspect.signature(stub):
        raise TypeError(f"{impl.__qualname__} does not have the signature of op {stub.__name__}: "
                        f"{inspect.signature(impl)} != {inspect.signature(stub)}")


def triton_op(namespace: str, stub: Callable, interpreted: bool) -> Callable:
    """Decorator: register a Triton launch function as op ``namespace::<stub name>``."""
    mutates = dict(OPS + TRITON_OPS)[stub]

    def register(impl: Callable):
        check_signature(impl, stub)
        qualname = f"{namespace}::{stub.__name__}"
        if interpreted:  # InterpretedFunctions carry no JIT metadata: an opaque op with the stub as fake
            op = torch.library.custom_op(qualname, impl, mutates_args=mutates)
            op.register_fake(stub)
            return op
        return torch.library.triton_op(qualname, impl, mutates_args=mutates)

    return register


__all__: List[str] = ["OPS", "TRITON_OPS", "CPP_DIAGNOSTICS", "define_cpp_ops", "triton_op", "ppo_forward",
                      "ppo_backward", "ppo_backward_inplace", "logprobs", "ppo_forward_grad",
                      "ppo_forward_grad_inplace"]
