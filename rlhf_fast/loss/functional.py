"""Public functional API: ``rf.ppo_loss`` and ``rf.logprobs``.

Data flows one way: arguments → :class:`~rlhf_fast.loss.options.LossOptions` (scalar
options, validated once) and :func:`~rlhf_fast.loss.inputs.prepare` (per-token inputs) →
one backend (the eager reference, or a fused :class:`~rlhf_fast.backends.RowOps` under
:class:`~rlhf_fast.loss.autograd.FusedPPOLoss`) → per-token results → :mod:`~rlhf_fast.loss.token_loss`
(the weighted per-token loss, metrics, masked outputs).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import backends
from ..backends.rows import refuse_overlapping
from . import inputs, reference
from .aggregation import PPOLossOutput
from .autograd import FusedPPOLoss, RowLogprobs
from .options import LossOptions
from .token_loss import finish_token_loss, fused_output


def check_logits(logits) -> None:
    """The checks that concern the logits tensor itself (``ValueError`` naming it)."""
    inputs.check_scores("logits", logits, "a vocabulary dimension: shape [..., V]")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has an empty vocabulary dimension (V == 0), shape {tuple(logits.shape)}")


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


def row_ops(name: str, process_group=None) -> backends.RowOps:
    """The row backend ``name`` (``"eager"``: the closed-form reference), sharded with a process group."""
    ops, why = backends.load_ops(name)
    if ops is None:
        raise RuntimeError(f"backend {name!r} is not available ({why})")
    if process_group is not None:
        from .vocab_parallel import sharded_ops

        ops = sharded_ops(ops, process_group)
    return ops


def check_inplace(logits: torch.Tensor, inplace_backward: bool) -> None:
    """``inplace_backward`` writes d(logits) into the logits' memory: refuse memory that overlaps itself."""
    if inplace_backward:
        refuse_overlapping(logits)


@inputs.loss_entry
def ppo_loss(
    logits: torch.Tensor,
    *tensors: torch.Tensor,
    inplace_backward: bool = False,
    grad_in_forward: bool = False,
    backend: str = "auto",
    process_group=None,
    **keywords,
) -> PPOLossOutput:
    """PPO loss (and its variants) for logits ``[..., V]`` and targets ``[...]`` (docs/contract.md).

    The loss options (``clip_eps``, ``kl_coef``, ``loss_agg``, ``policy_loss``, ...; see
    :class:`~rlhf_fast.LossOptions`) are keyword arguments, or one ``options=LossOptions(...)``
    object (keywords given as well replace its fields). ``rollout_logprobs`` ``[...]`` are the
    inference engine's log-probs (for ``rollout_is``); ``cu_seqlens`` ``[S + 1]`` marks packed
    sequences in a flattened leading shape.

    Returns :class:`PPOLossOutput`: the differentiable fp32 loss, detached fp32 per-token
    log-probs and entropy (0 where masked) and the metrics. With ``inplace_backward=True``
    the backward writes d(loss)/d(logits) into the logits' memory: the logits must not be
    used after ``backward()``. ``grad_in_forward=True`` asks for the gradient to be formed in the
    forward by one kernel that reads each row once (Triton, plain PPO, rows of up to 64 KiB;
    elsewhere the usual two passes run, with the same results); with ``inplace_backward`` the
    logits are then overwritten by the forward itself.

    With ``process_group``, ``logits`` is this rank's contiguous vocabulary shard
    ``[..., V_rank]`` (ranks in order; shards may differ in size) and targets are global
    ids; the loss, per-token outputs and metrics are the full-vocabulary ones on every
    rank, and the gradient is this shard's (see :mod:`rlhf_fast.loss.vocab_parallel`).
    """
    args = inputs.bind("ppo_loss", tensors, keywords)
    options = args.options
    check_logits(logits)
    check_inplace(logits, inplace_backward)
    x = inputs.prepare(logits.shape[:-1], logits.shape[-1], logits.device, logits.dtype, args, process_group)
    name = backends.resolve(backend, logits)
    if name == "eager" and process_group is None:
        return reference.ppo_loss(logits, x)
    ops = row_ops(name, process_group)
    if not options.is_plain_ppo:  # a variant or correction: fused statistics, the per-token math on [N]
        lp, entropy = RowLogprobs.apply(rows_view(logits), x.targets, options.temperature, ops, inplace_backward)
        return finish_token_loss(lp, entropy, x)
    loss, lp, entropy, ratio, pg, kl, log_scale, kl_log_scale = FusedPPOLoss.apply(
        rows_view(logits), x.targets, x.valid, x.weights, x.advantages, x.old_logprobs, x.ref_logprobs, x.params,
        ops, inplace_backward, grad_in_forward,
    )
    return fused_output(loss, lp, entropy, ratio, pg, kl, log_scale, kl_log_scale, x)


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
    """Log-probs of the targets ``[...]`` (fp32, 0 where masked); ``(logprobs, entropy)`` with ``with_entropy``.

    Never materialises the full-vocabulary log-softmax on a fused backend. When grad mode is on
    and ``logits`` require grad, the outputs are differentiable: the gradient of any function
    of them flows to the logits through the backend's fused backward (no ``[N, V]`` temporary
    but d(logits) itself); otherwise this is the no-grad pass for old/reference log-probs.
    ``process_group``: as in :func:`ppo_loss`.
    """
    LossOptions(temperature=temperature)  # validates τ
    check_logits(logits)
    checks = inputs.Checks(True)
    safe, valid = inputs.prepare_targets(logits.shape[:-1], logits.shape[-1], logits.device, targets, mask, checks,
                                         process_group)
    checks.resolve()
    name = backends.resolve(backend, logits)
    shape = logits.shape[:-1]
    if not (torch.is_grad_enabled() and logits.requires_grad):
        with torch.no_grad():
            stats = row_ops(name, process_group).logprobs(rows_view(logits), safe, float(temperature), with_entropy)
            lp, entropy = stats.logprobs, stats.entropy
    elif name == "eager" and process_group is None:
        lp, entropy, _, _ = reference.selective_logprobs_entropy(logits, safe.view(shape), temperature,
                                                                 valid.view(shape))
        lp, entropy = lp.reshape(-1), entropy.reshape(-1)
    else:
        lp, entropy = RowLogprobs.apply(rows_view(logits), safe, float(temperature), row_ops(name, process_group),
                                        False)
    dtype = inputs.compute_dtype(logits.dtype)
    lp = torch.where(valid, lp.to(dtype), torch.zeros((), dtype=dtype, device=lp.device)).view(shape)
    if not with_entropy:
        return lp
    entropy = torch.where(valid, entropy.to(dtype), torch.zeros((), dtype=dtype, device=lp.device)).view(shape)
    return lp, entropy
