"""Public functional API: validation, broadcasting, dispatch to one backend, aggregation.

Data flows one way: arguments → :func:`_prepare` (SPEC §6 checks, per-row vectors) →
one backend (eager reference, or a fused :class:`~rlhf_fast.backends.RowOps` under
:class:`~rlhf_fast.autograd.FusedPPOLoss`) → per-token results → metrics.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from . import backends, reference
from .autograd import FusedPPOLoss
from .config import LOSS_AGGREGATIONS, LossConfig, make_config


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """Differentiable fp32 scalar."""
    logprobs: torch.Tensor
    """Detached fp32 ``[...]`` (the leading shape of targets), 0 where masked."""
    entropy: torch.Tensor
    """Detached fp32 ``[...]``, 0 where masked."""
    metrics: Dict[str, torch.Tensor]
    """Detached fp32 scalars of SPEC §5 (no host sync inside the call)."""


class _Rows(NamedTuple):
    """Validated inputs as the backends take them."""

    logits3: torch.Tensor  # [B, T, V] view of the logits (stride 1 on V)
    targets: torch.Tensor  # [N] sanitised ids (0 where masked)
    valid: torch.Tensor  # [N] bool
    shape: torch.Size  # leading shape of the targets


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _check_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}; put all tensors on one device")


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """View logits ``[..., V]`` as ``[B, T, V]`` without a copy when the strides allow.

    Leading dims merge when they are contiguous with each other; a view such as
    ``logits[:, :-1]`` keeps two leading strides. Otherwise (or if V's stride is not 1)
    the logits are copied once.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    sizes, strides = list(logits.shape[:-1]), list(logits.stride()[:-1])
    dims = []  # merged (size, stride) pairs, outermost first
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 2:
        logits = logits.contiguous()
        return logits.view(1, -1, logits.shape[-1])
    while len(dims) < 2:
        dims.insert(0, (1, 0))
    (b, _), (t, _) = dims
    # view, not as_strided: as_strided's backward scatters into a zeroed copy of the whole
    # storage (two extra passes over [N, V]) and defeats inplace_backward under compile.
    return logits.view(b, t, logits.shape[-1])


def _prepare_rows(logits, targets, mask, validate: bool, process_group=None) -> _Rows:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not _is_float(logits):
        raise ValueError(f"logits must be a floating-point tensor (fp32, bf16 or fp16), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension: shape [..., V]")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits has an empty vocabulary dimension (V == 0), shape {tuple(logits.shape)}")
    device = logits.device
    _check_tensor("targets", targets, device)
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    lead = logits.shape[:-1]
    if targets.shape != lead:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits' leading shape {tuple(lead)} "
            f"(logits {tuple(logits.shape)})"
        )
    if mask is None:
        valid = torch.ones(lead, dtype=torch.bool, device=device)
    else:
        _check_tensor("mask", mask, device)
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match targets shape {tuple(lead)}")
        valid = mask if mask.dtype == torch.bool else mask != 0
    total_vocab = vocab
    if process_group is not None:  # logits hold this rank's vocabulary shard
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
    else:  # shard-local ids; −1 where another rank owns the target (or the row is masked)
        local = targets - vocab_start.to(targets.dtype)
        owned = valid & in_range & (local >= 0) & (local < vocab)
        safe = torch.where(owned, local, torch.full_like(local, -1))
    safe = safe.reshape(-1).contiguous()
    return _Rows(rows_view(logits), safe, valid.reshape(-1).contiguous(), lead)


def _per_row(name: str, t, rows: _Rows, device, allow_per_sequence: bool = False) -> Optional[torch.Tensor]:
    """A per-token float input as a contiguous fp32 ``[N]`` vector (fp64 with fp64 logits)."""
    if t is None:
        return None
    _check_tensor(name, t, device)
    if not _is_float(t):
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    shape = rows.shape
    if t.shape != shape:
        per_seq = allow_per_sequence and len(shape) >= 2 and t.shape == shape[:1]
        if not per_seq:
            hint = f" or [{shape[0]}] (one per sequence)" if allow_per_sequence and len(shape) >= 2 else ""
            raise ValueError(f"{name} shape {tuple(t.shape)} must be {tuple(shape)}{hint}")
        t = t.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)
    dtype = torch.float64 if rows.logits3.dtype == torch.float64 else torch.float32
    t = t.to(dtype).reshape(-1)
    # Padding values (NaN, inf) at masked positions must not leak into the loss or its gradient.
    return torch.where(rows.valid, t, torch.zeros_like(t)).contiguous()


def _weights(rows: _Rows, loss_agg: str, global_num_tokens) -> torch.Tensor:
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    if loss_agg != "token-mean":
        if len(rows.shape) != 2:
            raise ValueError(
                f"loss_agg {loss_agg!r} needs targets of shape [B, T], got {tuple(rows.shape)}"
            )
        if global_num_tokens is not None:
            raise ValueError("global_num_tokens applies to loss_agg='token-mean' only")
    if global_num_tokens is not None and not isinstance(global_num_tokens, torch.Tensor):
        if isinstance(global_num_tokens, bool) or not isinstance(global_num_tokens, (int, float)):
            raise ValueError(f"global_num_tokens must be a number or a tensor, got {global_num_tokens!r}")
        if global_num_tokens <= 0:
            raise ValueError(f"global_num_tokens must be > 0, got {global_num_tokens!r}")
    valid = rows.valid.view(rows.shape)
    return reference.aggregation_weights(valid, loss_agg, global_num_tokens).reshape(-1).contiguous()


def ppo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    global_num_tokens: Union[int, float, torch.Tensor, None] = None,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: str = "auto",
    process_group=None,
) -> PPOLossOutput:
    """Fused PPO loss of SPEC §1–§5 for logits ``[..., V]`` and targets ``[...]``.

    Returns :class:`PPOLossOutput`: the differentiable fp32 loss, detached fp32
    per-token log-probs and entropy (0 where masked) and the metrics of SPEC §5.
    With ``inplace_backward=True`` the backward writes d(loss)/d(logits) into the
    logits' memory: the logits must not be used after ``backward()``.

    With ``process_group``, ``logits`` is this rank's contiguous vocabulary shard
    ``[..., V_rank]`` (ranks in order; shards may differ in size) and targets are global
    ids; the loss, per-token outputs and metrics are the full-vocabulary ones on every
    rank, and the gradient is this shard's (see :mod:`rlhf_fast.vocab_parallel`).
    """
    cfg = make_config(
        clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, temperature=temperature,
        has_old=old_logprobs is not None, has_ref=ref_logprobs is not None,
    )
    rows = _prepare_rows(logits, targets, mask, validate, process_group)
    device = logits.device
    adv = _per_row("advantages", advantages, rows, device, allow_per_sequence=True)
    if adv is None:
        raise ValueError("advantages must be a tensor, got None")
    old = _per_row("old_logprobs", old_logprobs, rows, device)
    ref = _per_row("ref_logprobs", ref_logprobs, rows, device)
    weights = _weights(rows, loss_agg, global_num_tokens)
    name = backends.resolve(backend, logits)
    if name == "eager" and process_group is None:
        return _eager(logits, rows, weights, adv, old, ref, cfg)
    ops = _row_ops(name, process_group)
    loss, lp, entropy, ratio, pg, kl = FusedPPOLoss.apply(
        rows.logits3, rows.targets, rows.valid, weights, adv, old, ref, cfg, ops, inplace_backward
    )
    return _finish(loss, lp, entropy, ratio, pg, kl, rows, adv, old, cfg)


def _row_ops(name: str, process_group) -> backends.RowOps:
    ops = backends.REFERENCE_OPS if name == "eager" else backends.load_ops(name)[0]
    if process_group is not None:
        from .vocab_parallel import sharded_ops

        ops = sharded_ops(ops, process_group)
    return ops


def _eager(logits, rows: _Rows, weights, adv, old, ref, cfg: LossConfig) -> PPOLossOutput:
    shape = rows.shape
    loss, lp, entropy, metrics = reference.ppo_loss(
        logits, rows.targets.view(shape), rows.valid.view(shape), weights.view(shape), adv.view(shape),
        None if old is None else old.view(shape), None if ref is None else ref.view(shape), cfg,
    )
    return PPOLossOutput(loss, lp, entropy, metrics)


def _finish(loss, lp, entropy, ratio, pg, kl, rows: _Rows, adv, old, cfg: LossConfig) -> PPOLossOutput:
    """Metrics from a fused backend's per-token results, and masked outputs zeroed."""
    log_ratio = lp - old if old is not None else torch.zeros_like(lp)
    metrics = reference.loss_metrics(rows.valid, adv, ratio, log_ratio, pg, kl, entropy, cfg)
    zeros = torch.zeros_like(lp)
    lp_out = torch.where(rows.valid, lp, zeros).view(rows.shape)
    entropy_out = torch.where(rows.valid, entropy, zeros).view(rows.shape)
    return PPOLossOutput(loss, lp_out, entropy_out, metrics)


@torch.no_grad()
def logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "auto",
    process_group=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs of the targets ``[...]`` (fp32, no grad, 0 where masked) for old/ref policies.

    With ``with_entropy=True`` returns ``(logprobs, entropy)``. Never materialises the
    full-vocabulary log-softmax on a fused backend. ``process_group``: as in :func:`ppo_loss`.
    """
    make_config(temperature=temperature)  # validates τ
    rows = _prepare_rows(logits, targets, mask, True, process_group)
    ops = _row_ops(backends.resolve(backend, logits), process_group)
    lp, entropy = ops.logprobs(rows.logits3, rows.targets, float(temperature), with_entropy)
    lp = torch.where(rows.valid, lp, torch.zeros_like(lp)).view(rows.shape)
    if not with_entropy:
        return lp
    entropy = torch.where(rows.valid, entropy, torch.zeros_like(entropy)).view(rows.shape)
    return lp, entropy
