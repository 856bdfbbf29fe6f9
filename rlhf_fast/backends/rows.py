"""What a row backend receives (:class:`RowParams`) and returns (:class:`TokenResults`).

A row backend sees logits as ``[B, T, V]`` (free strides on B and T, stride 1 on V) and
per-row vectors ``[N = B·T]``. It never sees the user's keyword arguments: the loss layer
turns them into a :class:`RowParams`, whose numbers are runtime values for the kernels (no
recompilation per value); only ``has_old``, ``has_ref``, ``kl_estimator`` and the dual-clip
switch are feature switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake


@dataclass(frozen=True)
class RowParams:
    """Per-token loss settings as a backend sees them (the per-token math of the contract).

    No defaults: ``LossOptions.row_params`` builds them from the loss options, whose defaults are the only ones.
    """

    clip_eps_low: float
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    clip_eps_high: float
    """ε_high: the ratio is clipped above at 1 + ε_high."""
    dual_clip: float
    """c > 1 bounds the surrogate of negative advantages at −c·A; 0 disables it."""
    kl_coef: float
    """β, the weight of the KL estimator in the per-token loss."""
    kl_estimator: int
    """Index into ``KL_ESTIMATORS`` (0 k1, 1 k2, 2 k3, 3 k3+)."""
    entropy_coef: float
    """η, the weight of the entropy bonus (subtracted from the loss)."""
    temperature: float
    """τ: logits are divided by τ before everything else."""
    has_old: bool
    """Whether behaviour-policy log-probs are given (otherwise the ratio is 1)."""
    has_ref: bool
    """Whether reference log-probs are given (otherwise KL is 0)."""

    @property
    def has_dual_clip(self) -> bool:
        return self.dual_clip > 0.0


SCALE_FROM = 64.0
"""Exponentials of the per-token math (the ratio e^(lp − old) of an unclipped token, e^δ of k3 / k3+) above
e^64 are carried as a value and a power of e (``log_scale``): e^64 · 5e10 still fits fp32, so a coefficient
up to 5e10 (an advantage, β, a rollout weight) multiplies them without overflow, and below e^64 the values are
those of the plain formulas, bit for bit."""
SCALE_MAX = 87.0
"""The largest ``log_scale``: e^87 and e^−87 are both normal fp32 numbers, so scaling back never overflows on
its own and scaling down never loses digits to denormals."""


class TokenResults(NamedTuple):
    """Per-token results of a fused forward, all fp32 ``[N]`` (N = number of rows).

    pg, loss and dlogp are scaled by e^−log_scale, kl by e^−kl_log_scale: a value beyond fp32 (an unclipped
    ratio of e^90 times an advantage, k3 at δ = 90) stays finite until the caller has weighed it
    (:func:`rlhf_fast.loss.aggregation.scaled_sum`). Both scales are 0, and the values the plain ones, unless
    an exponential exceeds e^``SCALE_FROM``.

    Rows that the caller masks out are computed like any other (their targets are
    sanitised to 0 before the call); the caller zeroes or ignores them.
    """

    logprobs: torch.Tensor  # lp = (x_y − m) − log s
    entropy: torch.Tensor  # H = log s − Σ p·(x − m)
    row_max: torch.Tensor  # m = max_j x_j, x = logits / τ (−inf when every logit is −inf)
    log_sum: torch.Tensor  # log s, s = Σ_j exp(x_j − m)
    ratio: torch.Tensor  # r = exp(lp − old), 1 without old log-probs (not scaled: inf beyond fp32)
    pg: torch.Tensor  # clipped (and dual-clipped) surrogate, · e^−log_scale
    kl: torch.Tensor  # the chosen KL estimator, 0 without reference log-probs, · e^−kl_log_scale
    loss: torch.Tensor  # ℓ = pg + β·kl − η·H, · e^−log_scale
    dlogp: torch.Tensor  # g = dℓ/d lp (surrogate and KL parts; the entropy part is separate), · e^−log_scale
    log_scale: torch.Tensor  # s ∈ [0, SCALE_MAX] of pg, loss and dlogp
    kl_log_scale: torch.Tensor  # the scale of kl
    outside: Optional[torch.Tensor] = None  # not a kernel output: as RowStats.outside


KERNEL_OUTPUTS = 11
"""The fields of :class:`TokenResults` a fused forward writes (all but ``outside``)."""


def log_scale_of(exponent: torch.Tensor) -> torch.Tensor:
    """The scale s = clamp(exponent − SCALE_FROM, 0, SCALE_MAX) of an exponential e^exponent (0 for NaN)."""
    return torch.where(exponent > SCALE_FROM, (exponent - SCALE_FROM).clamp(max=SCALE_MAX),
                       torch.zeros((), dtype=exponent.dtype, device=exponent.device))


class RowStats(NamedTuple):
    """Per-row softmax statistics of ``logprobs``, fp32 ``[N]`` each."""

    logprobs: torch.Tensor  # lp = (x_y − m) − log s
    entropy: Optional[torch.Tensor]  # H, or None when not asked for
    row_max: torch.Tensor  # m
    log_sum: torch.Tensor  # log s
    outside: Optional[torch.Tensor] = None
    """The probability of the row's entries outside these logits (the other vocabulary shards of a
    ``process_group``), for the owner of the target: ``backward`` needs it for 1 − p_y. None: the whole row."""


def storage_span(t: torch.Tensor) -> int:
    """Elements from the first to the last that ``t`` addresses (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def may_overlap_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded tensor, say).

    Conservative: dims (size > 1) sorted by stride must each step over everything the smaller
    ones span; a layout that fails this could still be injective, but no view torch makes is.
    """
    if t.numel() == 0:
        return False
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    span = 0
    for stride, size in dims:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def refuse_overlapping(logits: torch.Tensor) -> None:
    """In-place gradients need logits whose elements own their memory: a clear error otherwise."""
    if may_overlap_itself(logits):
        raise ValueError(
            "logits: inplace_backward=True writes the gradient into the logits, but elements of these logits share "
            f"memory (shape {tuple(logits.shape)}, strides {logits.stride()}, e.g. an expanded tensor); pass "
            "logits that own their memory (logits.contiguous()) or inplace_backward=False"
        )


def _address_range(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """[first byte, one past the last byte] that ``t`` addresses, or None while torch.compile traces (fake
    tensors have no memory; the compiled graph allocates the gradient buffer itself)."""
    if torch.compiler.is_compiling() or is_fake(t):
        return None
    start = t.data_ptr()
    return start, start + storage_span(t) * t.element_size()


def check_gradient_out(logits: torch.Tensor, out: torch.Tensor) -> None:
    """``out``, which a backward writes, must be ``logits``' own memory in the same layout (in place) or
    memory provably disjoint from it, and no two of its elements may share memory.

    What cannot be proven disjoint (overlapping address ranges in another layout, e.g. a shifted view of the
    same buffer) is refused, even where the elements happen not to collide: a wrong guess would silently
    write wrong values.
    """
    if out.numel() == 0:
        return
    if may_overlap_itself(out):
        raise ValueError(
            f"out: elements of the gradient buffer share memory (shape {tuple(out.shape)}, strides {out.stride()}, "
            "e.g. an expanded tensor), so the gradient cannot be written into it; pass a buffer that owns its memory "
            "(torch.empty_like(logits))"
        )
    if out is logits:
        return
    out_range, logits_range = _address_range(out), _address_range(logits)
    if out_range is None or logits_range is None:
        return
    if out_range[0] == logits_range[0] and out.shape == logits.shape and out.stride() == logits.stride():
        return  # the logits' own memory, element for element: in place
    if out_range[1] <= logits_range[0] or logits_range[1] <= out_range[0]:
        return
    raise ValueError(
        "out: the gradient buffer overlaps the logits' memory without being the logits themselves (out starts "
        f"{out_range[0] - logits_range[0]} bytes after them, strides {out.stride()} against {logits.stride()}), so "
        "writing it could overwrite logits not yet read; pass the logits themselves (in place) or a separate buffer"
    )


class RowOps(NamedTuple):
    """A fused row backend: three functions over logits ``[B, T, V]`` and per-row vectors ``[N]``.

    * ``forward(logits, targets, advantages, old_logprobs, ref_logprobs, params) -> TokenResults``
    * ``backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out,
      outside=None)`` writes d(loss)/d(logits) = (1/τ)·[c_lp·(1[j=y] − p_j) + c_H·p_j·(log p_j + H)] into
      ``out`` (``[B, T, V]``, which may be ``logits`` itself, else memory disjoint from them:
      :func:`check_gradient_out`), with p_j = exp((x_j − m) − log s); rows whose two coefficients are 0 get
      exact zeros, entries with p_j = 0 get 0 (even from an infinite coefficient). For a confident target
      (Σ_{j≠y} p_j < 1/2) the one-hot factor 1 − p_y is that sum (plus ``outside`` [N], the probability on
      other vocabulary shards), not 1 − p_y, which would cancel;
    * ``logprobs(logits, targets, temperature, with_entropy) -> RowStats``;
    * optionally ``forward_with_grad`` (below): the forward that also writes the gradient.

    Every backend subtracts the row maximum before anything else (lp = (x_y − m) − log s,
    never x_y − (m + log s)), so large logits lose no digits. Targets arrive sanitised
    (every id in [0, V)), as contiguous int32 or int64; the other vectors as contiguous fp32.
    ``backward`` also accepts a target of −1: the row's target lies on another vocabulary
    shard (``process_group``), so there is no one-hot term.
    """

    forward: Callable
    backward: Callable
    logprobs: Callable
    forward_with_grad: Optional[Callable] = None
    """Optional: ``forward_with_grad(logits, targets, advantages, old, ref, params, weights, out)`` →
    TokenResults, also writing d(Σ w·ℓ)/d(logits) (upstream gradient 1) into ``out`` in the same pass."""
