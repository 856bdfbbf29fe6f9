"""Fused-linear PPO loss: the loss from hidden states and the LM head, never materialising the logits.

``fused_linear_ppo_loss(hidden [..., H], weight [V, H], ...)`` equals
``ppo_loss(hidden @ weight.T (+ bias), ...)`` but holds at most one ``[chunk, V]`` block of
logits at a time. Per chunk of ``chunk`` tokens:

1. ``logits = h_chunk @ W.T (+ b)`` into one reusable ``[chunk, V]`` buffer (dtype of ``hidden``),
   then the model's output transform, if any: ``logit_scale`` s (logits·s, as Cohere) and
   ``logit_softcap`` c (c·tanh(logits / c), as Gemma 2/3), in that order, in place;
2. the row backend (Triton on CUDA, C++ on CPU when built, the closed-form reference
   otherwise) gives the per-token results of the contract;
3. if a gradient is wanted, the same backend writes d(loss)/d(logits) *in place* into the
   buffer. This is possible in the forward because every aggregation mode is linear,
   loss = Σ w·ℓ with per-token weights w known before any logit is seen, so
   c_lp = g·w and c_H = η·w (upstream gradient 1);
4. the transform's chain rule (s folds into the coefficients of step 3; the cap's
   derivative s·(1 − tanh²) needs a second ``[chunk, V]`` buffer, as d(logits) cannot
   overwrite the capped logits it is computed from);
5. ``d hidden_chunk = dlogits @ W``, ``d W += dlogitsᵀ @ h_chunk`` and ``d b += Σ dlogits``
   (``d W`` and ``d b`` accumulate in fp32).

The autograd backward only multiplies the stored gradients by the upstream scalar. Plain PPO
gets step 2's coefficients from the fused kernel; a variant whose per-token loss depends on
its own token only (CISPO, SAPO, the clamps, token-level rollout correction) gets them from
the chunk's (lp, H) and the per-token math of :mod:`rlhf_fast.loss.policy` on that chunk, in
the same single pass. GSPO and sequence-level rollout correction need a whole sequence's
log-probs first: their chunks hold whole sequences (with ``chunk_size=None`` the chunk grows to
the longest sequence within the buffer's element budget), and only a sequence longer than a
chunk makes them run a statistics pass, then a backward that recomputes each chunk's logits.

Memory beyond the inputs and the gradients themselves: the ``[chunk, V]`` buffer, the row
backend's per-chunk temporaries (several fp32 ``[chunk, V]`` for the eager fallback, none
for the fused backends), the fp32 ``[V, H]`` weight-gradient accumulator and O(N) per-token
vectors. Nothing of size N·V, whatever N is.

What the caller should know:

* The gradients are computed in the forward. Calling it with grad enabled and an input
  that requires grad costs the gradient matmuls even if ``backward()`` is never called;
  under ``torch.no_grad()`` (or when none of hidden/weight/bias requires grad) that work
  is skipped. ``fused_linear_logprobs`` is the no-grad pass for old/reference log-probs.
* The stored gradients are handed out once: a second ``backward()`` through the same
  call (``retain_graph=True``) raises ``RuntimeError``, and higher-order gradients
  (``create_graph=True``) are not supported. Call the function again instead.
* "In place" concerns only the internal logits buffer: the caller's ``hidden``,
  ``weight`` and ``bias`` are never written.
* Vocabulary-parallel (``process_group=``): each rank holds a contiguous row shard
  ``weight [V_rank, H]`` (and ``bias [V_rank]``) of the LM head, ranks in order, sizes
  may differ; ``hidden`` is replicated. The row work is
  :func:`rlhf_fast.loss.vocab_parallel.sharded_ops` (two small collectives per chunk), d(W)
  and d(b) stay local to the shard, and d(hidden) = Σ_rank dlogits_rank·W_rank is summed
  with **one** all-reduce of the fp32 ``[N, H]`` accumulator after the last chunk
  (rather than one per chunk): the same bytes in one collective instead of N/chunk
  latency-bound ones, and a single rounding to the hidden dtype, as in one process.
  Every rank returns the full d(hidden): do not all-reduce it again.
* A policy-loss variant or correction (``policy_loss`` other than "ppo", ``rollout_is``,
  ``kl_ratio_weighted``, ``log_ratio_clamp``, ``kl_clamp``) needs values known only after the
  forward (GSPO's sequence ratio needs a sequence's last token). Then the forward is a
  statistics pass and the backward recomputes each chunk's logits (two more matmuls per chunk)
  to write d(logits) with the per-token coefficients: :class:`~rlhf_fast.loss.chunked.FusedLinearLogprobs`,
  which is also what ``fused_linear_logprobs`` uses when its inputs require grad.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import backends
from . import inputs
from .aggregation import PPOLossOutput
from .chunk_size import agree_across_ranks, default_chunk_size, max_chunk_rows, sequence_lengths, sequence_spans
from .chunked import FusedLinearLogprobs, FusedLinearPPOLoss, FusedLinearTokenLoss, PPOPass, result_dtype, stats_pass
from .functional import row_ops
from .logit_transform import check_transform
from .options import LossOptions
from .token_loss import finish_token_loss, fused_output

__all__ = ["default_chunk_size", "fused_linear_logprobs", "fused_linear_ppo_loss"]


def check_linear(hidden, weight, bias, chunk_size) -> None:
    """``ValueError`` naming the argument, for what ``ppo_loss`` never sees (the rest is :mod:`.inputs`)."""
    inputs.check_scores("hidden", hidden, "a feature dimension: shape [..., H]")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has no rows (V == 0), shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} must be [V, H] with H = hidden.shape[-1] "
            f"= {hidden.shape[-1]}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; use one device")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias shape {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}; use one device")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int (or None for automatic), got {chunk_size!r}")


def _setup(hidden, weight, bias, chunk_size, backend, process_group, wants_hidden_grad: bool,
           longest_sequence: int = 0):
    """(hidden2d [N, H], row ops, chunk): the ranks of a process group agree on the chunk.

    ``longest_sequence`` (rows, for a sequence-level option): with ``chunk_size=None`` the chunk grows
    to it if that stays within the buffer's element budget, so that whole sequences fit a chunk and
    the loss takes one pass over the logits.
    """
    ops = row_ops(backends.resolve(backend, hidden), process_group)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0], hidden.shape[-1])
    if chunk_size is None and chunk < longest_sequence <= max_chunk_rows(weight.shape[0]):
        chunk = longest_sequence
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if process_group is not None:
        chunk = agree_across_ranks(chunk, hidden2d.shape[0], wants_hidden_grad, hidden.device, process_group)
    return hidden2d, ops, chunk


def _wants_grad(hidden, weight, bias) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))


@inputs.loss_entry
def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *tensors: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    logit_scale: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    backend: str = "auto",
    process_group=None,
    **keywords,
) -> PPOLossOutput:
    """PPO loss (and its variants) of ``logits = hidden @ weight.T (+ bias)`` without materialising the logits.

    hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` (one dtype, one device); ``logit_scale``
    s and ``logit_softcap`` c (numbers > 0, None = off) make the logits
    ``c·tanh(s·(hidden @ weight.T + bias) / c)`` before everything else (temperature included),
    as the output layer of Cohere (s) and Gemma 2/3 (c) models does; targets,
    advantages (or one per sequence), old/ref/rollout log-probs and mask ``[...]``, the leading
    shape of ``hidden``. Every option of :func:`rlhf_fast.ppo_loss` applies, except
    ``inplace_backward``, which is implied (d(logits) always overwrites the internal
    buffer). ``chunk_size`` = tokens per chunk; ``None`` picks :func:`default_chunk_size`.
    ``backend`` chooses the row backend (``"eager"`` = the closed-form reference, chunked).

    Returns :class:`~rlhf_fast.PPOLossOutput`; ``loss`` carries gradients for hidden,
    weight and bias (see the module docstring for when they are computed).

    With ``process_group``, ``weight`` ``[V_rank, H]`` and ``bias`` ``[V_rank]`` are this
    rank's contiguous vocabulary shard (ranks in order, sizes may differ), ``hidden`` and
    every per-token input are replicated, and targets are global ids. Every rank gets the
    full-vocabulary loss, per-token outputs and metrics, the full d(hidden) (already summed
    over ranks) and the gradient of its own weight/bias shard. Every rank must make the
    call; ``chunk_size`` is the smallest any rank asks for.
    """
    args = inputs.bind("fused_linear_ppo_loss", tensors, keywords)
    options = args.options
    check_linear(hidden, weight, bias, chunk_size)
    transform = check_transform(logit_scale, logit_softcap)
    x = inputs.prepare(hidden.shape[:-1], weight.shape[0], hidden.device, hidden.dtype, args, process_group,
                       other="hidden")
    with_grad = _wants_grad(hidden, weight, bias)
    sequence_level = with_grad and options.needs_sequences and not options.is_plain_ppo
    lengths = sequence_lengths(x.sequences) if sequence_level else []
    hidden2d, ops, chunk = _setup(hidden, weight, bias, chunk_size, backend, process_group,
                                  with_grad and hidden.requires_grad, max(lengths, default=0))
    spans = sequence_spans(lengths, chunk)
    if not options.is_plain_ppo and with_grad and (not sequence_level or spans is not None):  # one pass
        carrier, lp, entropy = FusedLinearTokenLoss.apply(hidden2d, weight, bias, x, ops, chunk, process_group,
                                                          transform, spans)
        out = finish_token_loss(lp, entropy, x)
        return out._replace(loss=out.loss + carrier)
    if not options.is_plain_ppo:  # sequence-level: statistics pass, gradients in the backward
        if with_grad:
            lp, entropy = FusedLinearLogprobs.apply(hidden2d, weight, bias, x.targets, options.temperature, ops,
                                                    chunk, process_group, transform)
        else:
            lp, entropy = stats_pass(hidden2d, weight, bias, x.targets, options.temperature, ops, chunk, True,
                                     transform)[:2]
        return finish_token_loss(lp, entropy, x)
    if with_grad:
        loss, *per_token = FusedLinearPPOLoss.apply(hidden2d, weight, bias, x, ops, chunk, process_group, transform)
    else:  # nothing to differentiate: skip the gradient work
        p = PPOPass(hidden2d, weight, bias, x, ops, chunk, (False, False, False), transform=transform)
        loss, per_token = p.loss(x), p.per_token()
    return fused_output(loss, *per_token, x)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
    logit_scale: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    backend: str = "auto",
    process_group=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs ``[...]`` of the targets under ``hidden @ weight.T (+ bias)`` (fp32, 0 where masked).

    The fused-linear counterpart of :func:`rlhf_fast.logprobs`: ``(logprobs, entropy)`` with
    ``with_entropy=True``. ``logit_scale`` and ``logit_softcap`` transform the logits as in
    :func:`fused_linear_ppo_loss`. When grad mode is on and hidden, weight or bias require grad, the
    outputs are differentiable: the backward recomputes each chunk's logits and writes
    d(logits) into the one ``[chunk, V]`` buffer, so no ``[N, V]`` tensor ever exists.
    ``process_group``: weight/bias are this rank's vocabulary shard, as in
    :func:`fused_linear_ppo_loss`.
    """
    LossOptions(temperature=temperature)  # validates τ
    check_linear(hidden, weight, bias, chunk_size)
    transform = check_transform(logit_scale, logit_softcap)
    lead = hidden.shape[:-1]
    checks = inputs.Checks(True)
    safe, valid = inputs.prepare_targets(lead, weight.shape[0], hidden.device, targets, mask, checks,
                                         process_group, other="hidden")
    checks.resolve()
    with_grad = _wants_grad(hidden, weight, bias)
    hidden2d, ops, chunk = _setup(hidden, weight, bias, chunk_size, backend, process_group,
                                  with_grad and hidden.requires_grad)
    if with_grad:
        lp, entropy = FusedLinearLogprobs.apply(hidden2d, weight, bias, safe, float(temperature), ops, chunk,
                                                process_group, transform)
    else:
        with torch.no_grad():
            lp, entropy = stats_pass(hidden2d, weight, bias, safe, temperature, ops, chunk, with_entropy,
                                     transform)[:2]
    zero = torch.zeros((), dtype=result_dtype(hidden), device=hidden.device)
    lp = torch.where(valid, lp, zero).view(lead)
    if not with_entropy:
        return lp
    return lp, torch.where(valid, entropy, zero).view(lead)
