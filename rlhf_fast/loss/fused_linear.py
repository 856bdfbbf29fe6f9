"""Fused-linear PPO loss: the loss from hidden states and the LM head, never materialising the logits.

``fused_linear_ppo_loss(hidden [..., H], weight [V, H], ...)`` equals
``ppo_loss(hidden @ weight.T (+ bias), ...)`` but holds at most one ``[chunk, V]`` block of
logits at a time. Per chunk of ``chunk`` tokens:

1. ``logits = h_chunk @ W.T (+ b)`` into one reusable ``[chunk, V]`` buffer (dtype of ``hidden``);
2. the row backend (Triton on CUDA, C++ on CPU when built, the closed-form reference
   otherwise) gives the per-token results of the contract;
3. if a gradient is wanted, the same backend writes d(loss)/d(logits) *in place* into the
   buffer. This is possible in the forward because every aggregation mode is linear,
   loss = Σ w·ℓ with per-token weights w known before any logit is seen, so
   c_lp = g·w and c_H = η·w (upstream gradient 1);
4. ``d hidden_chunk = dlogits @ W``, ``d W += dlogitsᵀ @ h_chunk`` and ``d b += Σ dlogits``
   (``d W`` and ``d b`` accumulate in fp32).

The autograd backward only multiplies the stored gradients by the upstream scalar.

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
* A per-token upstream gradient would be needed only if the caller differentiated a
  function of the per-token terms that is not the scalar loss, e.g. a custom non-linear
  aggregation or ``backward(gradient=v)`` of a vector of token losses. Then d(logits)
  depends on values that exist only after the forward, and the logits would have to be
  recomputed in the backward (two more matmuls per chunk). The returned per-token
  ``logprobs``/``entropy`` are detached, and the loss is a scalar, so this never arises here.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import backends
from ..backends.rows import RowOps
from . import inputs
from .aggregation import PPOLossOutput, finish
from .functional import row_ops
from .inputs import LossInputs
from .options import LossOptions, with_loss_options

_MIN_CHUNK = 256
"""Fewest rows per chunk (below it the matmuls are bound by reading the weight)."""
_MAX_CHUNK_ELEMENTS = 1 << 27
"""At most this many elements in the [chunk, V] buffer (512 MiB in fp32)."""


def default_chunk_size(vocab: int, hidden_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``.

    The rule: ``min(max(pow2_floor(H), 256), max(16, pow2_floor(2**27 // V)))``.

    * about H rows, so the ``[chunk, V]`` logits buffer is no larger than the weight
      ``[V, H]``: extra memory stays O(V·H) whatever the number of tokens;
    * at least 256 rows, so each chunk's matmuls reuse every weight element enough times
      to be compute-bound rather than weight-bandwidth-bound;
    * at most 2**27 buffer elements (512 MiB in fp32), which bounds the eager fallback's
      fp32 per-chunk temporaries at large V (V = 151936 gives 512 rows).
    """
    by_hidden = max(_pow2_floor(max(hidden_size, 1)), _MIN_CHUNK)
    by_vocab = max(16, _pow2_floor(max(_MAX_CHUNK_ELEMENTS // max(vocab, 1), 1)))
    return min(by_hidden, by_vocab)


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


# ----------------------------------------------------------------------------------
# Validation of the linear-layer inputs (the per-token ones are checked by .inputs).
# ----------------------------------------------------------------------------------


def _check_linear(hidden, weight, bias, chunk_size) -> None:
    """``ValueError`` naming the argument, for what ``ppo_loss`` never sees (the rest is :mod:`.inputs`)."""
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor (fp32, bf16 or fp16), got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have a feature dimension: shape [..., H]")
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


def _agree_across_ranks(chunk: int, n_rows: int, wants_hidden_grad: bool, device, group) -> int:
    """The chunk size every rank uses (the smallest asked for), after checking that the ranks agree.

    Each chunk runs collectives, so every rank must walk the same chunks: shard sizes (hence
    the default chunk) may differ, the number of tokens and whether d(hidden) is all-reduced
    may not. One small collective (and a host sync) per call.
    """
    flags = torch.tensor([-chunk, n_rows, -n_rows, int(wants_hidden_grad), -int(wants_hidden_grad)],
                         dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    neg_chunk, most_rows, neg_fewest_rows, any_grad, neg_all_grad = flags.tolist()
    if most_rows != -neg_fewest_rows:
        raise ValueError(
            f"hidden must be replicated across the process group: ranks have between {-neg_fewest_rows} and "
            f"{most_rows} tokens"
        )
    if any_grad != -neg_all_grad:
        raise ValueError("hidden requires grad on some ranks of the process group but not on others")
    return -neg_chunk


# ----------------------------------------------------------------------------------
# The chunked pass.
# ----------------------------------------------------------------------------------


def _result_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _logits_chunk(h: torch.Tensor, weight: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    # mm then add (rather than addmm) rounds exactly like `hidden @ weight.T + bias`.
    torch.mm(h, weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


_CUDA_OUT_DTYPE_MM = [True]  # set to False once the out_dtype matmul turns out unsupported


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 (fp64 for fp64 inputs) and a, b in the compute dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _CUDA_OUT_DTYPE_MM[0]:
        try:  # bf16/fp16 tensor-core matmul that accumulates into fp32 directly
            torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
            return
        except (RuntimeError, NotImplementedError):
            _CUDA_OUT_DTYPE_MM[0] = False
    # CPU has no mixed-dtype matmul: upcast the chunk (bounded: [chunk, V] + [chunk, H]).
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Pass:
    """Per-token results of the chunked pass and, when asked, the input gradients."""

    def __init__(self, n_rows: int, hidden: torch.Tensor, dtype: torch.dtype):
        empty = lambda: torch.empty(n_rows, dtype=dtype, device=hidden.device)
        self.logprobs, self.entropy, self.ratio = empty(), empty(), empty()
        self.pg, self.kl, self.token_loss = empty(), empty(), empty()
        self.grad_hidden: Optional[torch.Tensor] = None
        self.grad_weight: Optional[torch.Tensor] = None
        self.grad_bias: Optional[torch.Tensor] = None


def _chunked_pass(
    hidden2d: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: Optional[torch.Tensor],  # [V]
    x: LossInputs,  # per-token inputs, [N] each
    ops: RowOps,
    chunk: int,
    needs_grad: Tuple[bool, bool, bool],  # hidden, weight, bias
    process_group=None,  # vocabulary shards: weight/bias are this rank's rows
) -> _Pass:
    n_rows, hidden_size = hidden2d.shape
    vocab = weight.shape[0]
    device = hidden2d.device
    acc_dtype = _result_dtype(hidden2d)
    out = _Pass(n_rows, hidden2d, acc_dtype)
    need_h, need_w, need_b = needs_grad
    # Sharded: each rank's d(hidden) is a partial sum, kept in fp32 until the all-reduce.
    sum_hidden_grad = need_h and process_group is not None and hidden2d.dtype != acc_dtype
    if need_h:
        grad_dtype = acc_dtype if sum_hidden_grad else hidden2d.dtype
        out.grad_hidden = torch.empty(n_rows, hidden_size, dtype=grad_dtype, device=device)
    if need_w:
        out.grad_weight = torch.zeros(vocab, hidden_size, dtype=acc_dtype, device=device)
    if need_b:
        out.grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device)
    any_grad = need_h or need_w or need_b
    buffer = torch.empty(max(min(chunk, n_rows), 1), vocab, dtype=hidden2d.dtype, device=device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        span = slice(start, stop)
        h = hidden2d[span]
        logits = _logits_chunk(h, weight, bias, buffer[: stop - start])
        logits3 = logits.view(1, stop - start, vocab)
        targets = x.targets[span]
        res = ops.forward(
            logits3, targets, x.advantages[span],
            None if x.old_logprobs is None else x.old_logprobs[span],
            None if x.ref_logprobs is None else x.ref_logprobs[span],
            x.params,
        )
        for name in ("logprobs", "entropy", "ratio", "pg", "kl"):
            getattr(out, name)[span] = getattr(res, name)
        out.token_loss[span] = res.loss
        if not any_grad:
            continue
        w = x.weights[span]
        # Masked rows may hold NaN in g (a banned placeholder target): keep them out of d(logits).
        coef_logprob = torch.where(x.valid[span], res.dlogp * w, torch.zeros_like(res.dlogp)).contiguous()
        coef_entropy = (x.params.entropy_coef * w).contiguous()
        # d(loss)/d(logits) overwrites the logits: the buffer is ours and used only here.
        ops.backward(logits3, targets, res.row_max, res.log_sum, res.entropy, coef_logprob, coef_entropy,
                     x.params.temperature, logits3)
        if sum_hidden_grad:
            _accumulate_mm(out.grad_hidden[span].zero_(), logits, weight)
        elif need_h:
            torch.mm(logits, weight, out=out.grad_hidden[span])
        if need_w:
            _accumulate_mm(out.grad_weight, logits.t(), h)
        if need_b:
            out.grad_bias.add_(logits.sum(0, dtype=acc_dtype))
    if need_h and process_group is not None and n_rows > 0:
        dist.all_reduce(out.grad_hidden, group=process_group)  # Σ_rank dlogits_rank·W_rank
    return out


def _loss(p: _Pass, x: LossInputs) -> torch.Tensor:
    token_loss = torch.where(x.valid, p.token_loss, torch.zeros_like(p.token_loss))
    return (x.weights.to(token_loss.dtype) * token_loss).sum()


class _FusedLinearPPOLoss(torch.autograd.Function):
    """Forward: the chunked pass with gradients; backward: scale them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, x: LossInputs, ops, chunk, process_group):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        p = _chunked_pass(hidden2d, weight, bias, x, ops, chunk, needs, process_group)
        ctx.grads = (p.grad_hidden, p.grad_weight, p.grad_bias)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        outputs = (p.logprobs, p.entropy, p.ratio, p.pg, p.kl)
        ctx.mark_non_differentiable(*outputs)
        return (_loss(p, x),) + outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_ppo_loss computes its gradients in the forward and hands them out once; "
                "a second backward through the same call (retain_graph=True) is not supported: "
                "call fused_linear_ppo_loss again"
            )
        grads, ctx.grads = ctx.grads, None
        scaled = []
        for grad, dtype in zip(grads, ctx.dtypes, strict=True):
            if grad is None:
                scaled.append(None)
                continue
            grad.mul_(grad_loss)  # in place (fp32 opmath, one rounding): the stored gradient is not reused
            scaled.append(grad.to(dtype))
        return tuple(scaled) + (None,) * 4


# ----------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------


@with_loss_options
def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    options: Optional[LossOptions] = None,
    global_num_tokens: Union[int, float, torch.Tensor, None] = None,
    validate: bool = True,
    backend: str = "auto",
    process_group=None,
    **loss_options,
) -> PPOLossOutput:
    """PPO loss of ``logits = hidden @ weight.T (+ bias)`` without materialising the logits.

    hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` (one dtype, one device); targets,
    advantages (or ``[B]``), old/ref log-probs and mask ``[...]``, the leading shape of
    ``hidden``. Every option of :func:`rlhf_fast.ppo_loss` applies, except
    ``inplace_backward``, which is implied (d(logits) always overwrites the internal
    buffer). ``chunk_size`` = tokens per chunk; ``None`` picks :func:`default_chunk_size`.
    ``backend`` chooses the row backend (``"eager"`` = the closed-form reference, chunked).

    Returns :class:`~rlhf_fast.PPOLossOutput`; ``loss`` carries gradients for hidden,
    weight and bias, computed during this call (see the module docstring).

    With ``process_group``, ``weight`` ``[V_rank, H]`` and ``bias`` ``[V_rank]`` are this
    rank's contiguous vocabulary shard (ranks in order, sizes may differ), ``hidden`` and
    every per-token input are replicated, and targets are global ids. Every rank gets the
    full-vocabulary loss, per-token outputs and metrics, the full d(hidden) (already summed
    over ranks) and the gradient of its own weight/bias shard. Every rank must make the
    call; ``chunk_size`` is the smallest any rank asks for.
    """
    options = LossOptions.from_kwargs(options, loss_options, "fused_linear_ppo_loss")
    _check_linear(hidden, weight, bias, chunk_size)
    x = inputs.prepare(
        hidden.shape[:-1], weight.shape[0], hidden.device, hidden.dtype, targets, advantages, old_logprobs,
        ref_logprobs, mask, options, validate=validate, global_num_tokens=global_num_tokens,
        process_group=process_group, other="hidden",
    )
    ops = row_ops(backends.resolve(backend, hidden), process_group)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0], hidden.shape[-1])
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if process_group is not None:
        chunk = _agree_across_ranks(chunk, hidden2d.shape[0], with_grad and hidden.requires_grad, hidden.device,
                                    process_group)
    if with_grad:
        loss, lp, entropy, ratio, pg, kl = _FusedLinearPPOLoss.apply(hidden2d, weight, bias, x, ops, chunk,
                                                                     process_group)
    else:  # nothing to differentiate: skip the gradient work
        p = _chunked_pass(hidden2d, weight, bias, x, ops, chunk, (False, False, False))
        loss, lp, entropy, ratio, pg, kl = _loss(p, x), p.logprobs, p.entropy, p.ratio, p.pg, p.kl
    return finish(loss, lp, entropy, ratio, pg, kl, x.valid, x.shape, x.advantages, x.old_logprobs, x.params)


@torch.no_grad()
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
    backend: str = "auto",
    process_group=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs ``[...]`` of the targets under ``hidden @ weight.T (+ bias)``; no grad.

    The fused-linear counterpart of :func:`rlhf_fast.logprobs` (fp32, 0 where masked;
    ``(logprobs, entropy)`` with ``with_entropy=True``), for old/reference log-probs.
    ``process_group``: weight/bias are this rank's vocabulary shard, as in
    :func:`fused_linear_ppo_loss`.
    """
    LossOptions(temperature=temperature)  # validates τ
    _check_linear(hidden, weight, bias, chunk_size)
    lead = hidden.shape[:-1]
    safe, valid = inputs.prepare_targets(lead, weight.shape[0], hidden.device, targets, mask, True, process_group,
                                         other="hidden")
    ops = row_ops(backends.resolve(backend, hidden), process_group)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0], hidden.shape[-1])
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if process_group is not None:
        chunk = _agree_across_ranks(chunk, hidden2d.shape[0], False, hidden.device, process_group)
    n_rows, vocab = hidden2d.shape[0], weight.shape[0]
    dtype = _result_dtype(hidden)
    lp = torch.zeros(n_rows, dtype=dtype, device=hidden.device)
    entropy = torch.zeros(n_rows, dtype=dtype, device=hidden.device) if with_entropy else None
    buffer = torch.empty(max(min(chunk, n_rows), 1), vocab, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        logits = _logits_chunk(hidden2d[start:stop], weight, bias, buffer[: stop - start])
        chunk_lp, chunk_entropy, _, _ = ops.logprobs(
            logits.view(1, stop - start, vocab), safe[start:stop], float(temperature), with_entropy
        )
        lp[start:stop] = chunk_lp
        if with_entropy:
            entropy[start:stop] = chunk_entropy
    lp = torch.where(valid, lp, torch.zeros_like(lp)).view(lead)
    if not with_entropy:
        return lp
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy)).view(lead)
    return lp, entropy
