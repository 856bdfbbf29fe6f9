"""Input preparation shared by the logits and fused-linear losses.

Both losses check and flatten their per-token inputs here, once, into :class:`LossInputs`:
the checks of the contract's "inputs that must be rejected" section (``ValueError`` naming
the argument), sanitised targets, the valid mask, per-row fp32 vectors and the aggregation
weights. The caller only checks what is its own (the logits tensor, or hidden/weight/bias).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..backends.rows import RowParams
from .aggregation import aggregation_weights
from .options import LossOptions


class LossInputs(NamedTuple):
    """Validated per-token inputs, flattened to ``N`` rows, as the backends take them."""

    targets: torch.Tensor  # [N] sanitised ids (0 where masked; shard-local or −1 with a process group)
    valid: torch.Tensor  # [N] bool
    shape: torch.Size  # leading shape of the targets
    advantages: torch.Tensor  # [N] fp32 (fp64 for fp64 logits), 0 where masked
    old_logprobs: Optional[torch.Tensor]  # [N] or None
    ref_logprobs: Optional[torch.Tensor]  # [N] or None
    weights: torch.Tensor  # [N] aggregation weights: loss = Σ w·ℓ
    params: RowParams  # what a row backend sees


def check_tensor(name: str, t, device: torch.device, other: str = "logits") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {other} is on {device}; put all tensors on one device")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs stay fp64 (gradcheck, ground truth); everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_targets(
    lead: torch.Size, vocab: int, device: torch.device, targets, mask, validate: bool, process_group=None,
    other: str = "logits",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(targets [N], valid [N])``: ids checked against the vocabulary, sanitised where masked.

    With a ``process_group`` (vocabulary shards) the ids come back shard-local, −1 where
    another rank owns the target or the row is masked.
    """
    check_tensor("targets", targets, device, other)
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if targets.shape != lead:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match the leading shape {tuple(lead)} of {other}"
        )
    if mask is None:
        valid = torch.ones(lead, dtype=torch.bool, device=device)
    else:
        check_tensor("mask", mask, device, other)
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match targets shape {tuple(lead)}")
        valid = mask if mask.dtype == torch.bool else mask != 0
    total_vocab = vocab
    if process_group is not None:  # this rank holds a vocabulary shard
        from .vocab_parallel import shard_range

        vocab_start, total_vocab = shard_range(vocab, device, process_group)
    in_range = (targets >= 0) & (targets < total_vocab)
    if validate and torch.compiler.is_compiling():
        # No host sync inside a compiled graph: an asynchronous device assertion instead
        # (a RuntimeError when it fires, rather than the eager path's ValueError).
        torch._assert_async(~(valid & ~in_range).any(), "rlhf_fast: targets has ids outside [0, V) at valid positions")
    elif validate and bool((valid & ~in_range).any()):
        bad = targets[valid & ~in_range]
        raise ValueError(
            f"targets has ids outside [0, {int(total_vocab)}) at valid positions, e.g. {bad[:5].tolist()} "
            "(mask them out, or fix the vocabulary size)"
        )
    if process_group is None:
        safe = torch.where(valid & in_range, targets, torch.zeros_like(targets))
    else:
        local = targets - vocab_start.to(targets.dtype)
        owned = valid & in_range & (local >= 0) & (local < vocab)
        safe = torch.where(owned, local, torch.full_like(local, -1))
    return safe.reshape(-1).contiguous(), valid.reshape(-1).contiguous()


def per_row(
    name: str, t, shape: torch.Size, valid: torch.Tensor, device, dtype: torch.dtype,
    allow_per_sequence: bool = False, other: str = "logits",
) -> Optional[torch.Tensor]:
    """A per-token float input as a contiguous ``[N]`` vector in ``dtype``, 0 where masked."""
    if t is None:
        return None
    check_tensor(name, t, device, other)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape != shape:
        per_seq = allow_per_sequence and len(shape) >= 2 and t.shape == shape[:1]
        if not per_seq:
            hint = f" or [{shape[0]}] (one per sequence)" if allow_per_sequence and len(shape) >= 2 else ""
            raise ValueError(f"{name} shape {tuple(t.shape)} must be {tuple(shape)}{hint}")
        t = t.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)
    t = t.to(dtype).reshape(-1)
    # Padding values (NaN, inf) at masked positions must not leak into the loss or its gradient.
    return torch.where(valid, t, torch.zeros_like(t)).contiguous()


def loss_weights(shape: torch.Size, valid: torch.Tensor, loss_agg: str, global_num_tokens) -> torch.Tensor:
    """Per-token aggregation weights ``[N]`` after checking ``global_num_tokens``."""
    if loss_agg != "token-mean":
        if len(shape) != 2:
            raise ValueError(f"loss_agg {loss_agg!r} needs targets of shape [B, T], got {tuple(shape)}")
        if global_num_tokens is not None:
            raise ValueError("global_num_tokens applies to loss_agg='token-mean' only")
    if global_num_tokens is not None and not isinstance(global_num_tokens, torch.Tensor):
        if isinstance(global_num_tokens, bool) or not isinstance(global_num_tokens, (int, float)):
            raise ValueError(f"global_num_tokens must be a number or a tensor, got {global_num_tokens!r}")
        if global_num_tokens <= 0:
            raise ValueError(f"global_num_tokens must be > 0, got {global_num_tokens!r}")
    return aggregation_weights(valid.view(shape), loss_agg, global_num_tokens).reshape(-1).contiguous()


def prepare(
    lead: torch.Size,
    vocab: int,
    device: torch.device,
    dtype: torch.dtype,
    targets,
    advantages,
    old_logprobs,
    ref_logprobs,
    mask,
    options: LossOptions,
    *,
    validate: bool,
    global_num_tokens=None,
    process_group=None,
    other: str = "logits",
) -> LossInputs:
    """Every per-token input of a loss call, checked and flattened (``other`` names the scores' tensor).

    ``lead`` is the leading shape of the logits (or hidden states), ``vocab`` their (shard's)
    vocabulary size and ``dtype`` their dtype.
    """
    params = options.row_params(has_old=old_logprobs is not None, has_ref=ref_logprobs is not None)
    safe, valid = prepare_targets(lead, vocab, device, targets, mask, validate, process_group, other)
    if advantages is None:
        raise ValueError("advantages must be a tensor, got None")
    compute = compute_dtype(dtype)
    adv = per_row("advantages", advantages, lead, valid, device, compute, allow_per_sequence=True, other=other)
    old = per_row("old_logprobs", old_logprobs, lead, valid, device, compute, other=other)
    ref = per_row("ref_logprobs", ref_logprobs, lead, valid, device, compute, other=other)
    weights = loss_weights(lead, valid, options.loss_agg, global_num_tokens)
    return LossInputs(safe, valid, lead, adv, old, ref, weights, params)
