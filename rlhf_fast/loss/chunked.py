"""The chunk machinery of the fused-linear loss: logits ``hidden @ W.T (+ b)`` one ``[chunk, V]``
block at a time, through one reusable buffer, and the gradients of hidden, weight and bias
accumulated chunk by chunk (see :mod:`rlhf_fast.loss.fused_linear` for what the caller sees).

Three passes:

* :class:`FusedLinearPPOLoss` — the plain PPO loss with its gradients formed in the forward
  (every aggregation is linear, so each token's weight is known before any logit is seen);
  the backward only scales them by the upstream scalar;
* :class:`FusedLinearTokenLoss` — the same single pass for the variants: each chunk's (lp, H)
  give that chunk's coefficients at once (autograd of the per-token math on the chunk's
  ``[rows]`` slice), for a token-local option (CISPO, SAPO, clamps, token-level rollout
  correction) on any chunks, for a sequence-level one (GSPO, sequence-level rollout
  correction) on chunks of whole sequences (:func:`sequence_spans`);
* :class:`FusedLinearLogprobs` — differentiable (lp, H): a statistics pass in the forward,
  and a backward that recomputes each chunk's logits and writes d(logits) with the
  coefficients of any function of (lp, H): the sequence-level variants' path when a sequence
  is longer than a chunk.

All apply the model's :class:`LogitTransform` (a logit scale, tanh soft-capping) to each
chunk's logits before the row backend, and its chain rule to each chunk's d(logits).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..backends.rows import RowOps, RowStats
from .aggregation import scaled_sum
from .inputs import LossInputs
from .policy import Sequences
from .token_loss import weighted_token_loss

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
    return min(by_hidden, max_chunk_rows(vocab))


def max_chunk_rows(vocab: int) -> int:
    """The most rows a default ``[chunk, V]`` buffer may have: ``max(16, pow2_floor(2**27 // V))``."""
    return max(16, _pow2_floor(max(_MAX_CHUNK_ELEMENTS // max(vocab, 1), 1)))


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def agree_across_ranks(chunk: int, n_rows: int, wants_hidden_grad: bool, device, group) -> int:
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


def result_dtype(hidden: torch.Tensor) -> torch.dtype:
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


class Gradients:
    """d(hidden), d(weight), d(bias) accumulated chunk by chunk from d(logits) blocks.

    d(W) and d(b) accumulate in fp32 (fp64 for fp64 inputs). With vocabulary shards each rank's
    d(hidden) is a partial sum, kept in fp32 until :meth:`finish` all-reduces it once.
    """

    def __init__(self, hidden2d: torch.Tensor, weight: torch.Tensor, needs: Tuple[bool, bool, bool],
                 process_group=None):
        n_rows, hidden_size = hidden2d.shape
        vocab = weight.shape[0]
        device = hidden2d.device
        self.acc_dtype = result_dtype(hidden2d)
        self.weight, self.process_group = weight, process_group
        need_h, need_w, need_b = needs
        self.sum_hidden = need_h and process_group is not None and hidden2d.dtype != self.acc_dtype
        grad_dtype = self.acc_dtype if self.sum_hidden else hidden2d.dtype
        self.hidden = torch.empty(n_rows, hidden_size, dtype=grad_dtype, device=device) if need_h else None
        self.weight_grad = torch.zeros(vocab, hidden_size, dtype=self.acc_dtype, device=device) if need_w else None
        self.bias = torch.zeros(vocab, dtype=self.acc_dtype, device=device) if need_b else None

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight_grad is not None or self.bias is not None

    def add(self, span: slice, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        """One chunk: d(hidden)[span] = dlogits @ W, d(W) += dlogitsᵀ @ h, d(b) += Σ dlogits."""
        if self.sum_hidden:
            _accumulate_mm(self.hidden[span].zero_(), dlogits, self.weight)
        elif self.hidden is not None:
            torch.mm(dlogits, self.weight, out=self.hidden[span])
        if self.weight_grad is not None:
            _accumulate_mm(self.weight_grad, dlogits.t(), h)
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0, dtype=self.acc_dtype))

    def finish(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.hidden is not None and self.process_group is not None and self.hidden.shape[0] > 0:
            dist.all_reduce(self.hidden, group=self.process_group)  # Σ_rank dlogits_rank·W_rank
        return self.hidden, self.weight_grad, self.bias


_TRANSFORM_BLOCK_ELEMENTS = 1 << 20
"""Low-precision buffers are transformed in fp32 blocks of at most this many elements (4 MiB)."""


class LogitTransform(NamedTuple):
    """The elementwise map a model applies to its logits before the softmax.

    z ↦ s·z with ``scale`` s (Cohere's ``logit_scale``; Granite's 1 / ``logits_scaling``), then
    z ↦ c·tanh(z / c) with ``softcap`` c (Gemma 2/3's ``final_logit_softcapping``); None skips
    a step. The row backend sees the transformed logits; the chain rule turns its d(logits)
    back into the gradient of the linear layer's output: ·s, and ·(1 − tanh²) for the cap.
    """

    scale: Optional[float] = None
    softcap: Optional[float] = None

    @property
    def is_identity(self) -> bool:
        return self.scale is None and self.softcap is None

    @property
    def needs_spare(self) -> bool:
        """Whether the backward needs a second [chunk, V] buffer (the cap's derivative reads the logits)."""
        return self.softcap is not None

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform ``logits`` ``[rows, V]`` in place (fp32 math, one rounding for bf16 / fp16 buffers)."""
        if not self.is_identity:
            _blockwise(logits, None, self._forward)
        return logits

    def chain_(self, grad: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        """``grad`` ← grad·d(transformed)/dz, in place; ``transformed`` holds the transformed logits (soft-cap only)."""
        _blockwise(grad, transformed, self._backward)
        return grad

    def _forward(self, z: torch.Tensor, _unused) -> torch.Tensor:
        if self.scale is not None:
            z = z.mul_(self.scale)
        if self.softcap is not None:
            z = z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def _backward(self, grad: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        # d(c·tanh(s·z/c))/dz = s·(1 − t²), t = transformed / c (autograd's tanh backward reads tanh's output too)
        factor = transformed.div_(self.softcap).square_().neg_().add_(1.0)
        if self.scale is not None:
            factor = factor.mul_(self.scale)
        return grad.mul_(factor)


IDENTITY = LogitTransform()


def _blockwise(x: torch.Tensor, other: Optional[torch.Tensor], fn) -> None:
    """``x`` ← fn(x, other) in place (``other`` may be overwritten); bf16 / fp16 in fp32 blocks of rows."""
    if x.numel() == 0:
        return
    if x.dtype in (torch.float32, torch.float64):
        fn(x, other)
        return
    rows = max(1, _TRANSFORM_BLOCK_ELEMENTS // max(x.shape[-1], 1))
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        up = block.float()
        block.copy_(fn(up, None if other is None else other[start:start + rows].float()))


def check_transform(logit_scale, logit_softcap) -> LogitTransform:
    """The :class:`LogitTransform` of the keyword arguments (``ValueError`` naming a bad one)."""
    for name, value in (("logit_scale", logit_scale), ("logit_softcap", logit_softcap)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (or None for none), got {value!r}")
    return LogitTransform(None if logit_scale is None else float(logit_scale),
                          None if logit_softcap is None else float(logit_softcap))


def chunks(hidden2d: torch.Tensor, weight: torch.Tensor, bias, chunk: int,
           transform: LogitTransform = IDENTITY, spare: bool = False, spans: Optional[List[slice]] = None):
    """``(span, h, logits [rows, V], spare)`` per chunk of rows (``spans``: given spans of at most ``chunk`` rows).

    ``logits`` = transform(h @ W.T (+ b)) lives in one reused buffer; ``spare`` is a second
    buffer of the same shape when asked for and the transform's backward needs one, else None.
    """
    n_rows, vocab = hidden2d.shape[0], weight.shape[0]
    rows = max(min(chunk, n_rows), 1)
    buffer = torch.empty(rows, vocab, dtype=hidden2d.dtype, device=hidden2d.device)
    second = torch.empty_like(buffer) if spare and transform.needs_spare else None
    if spans is None:
        spans = [slice(start, min(start + chunk, n_rows)) for start in range(0, n_rows, chunk)]
    for span in spans:
        start, stop = span.start, span.stop
        h = hidden2d[start:stop]
        logits = transform.apply_(_logits_chunk(h, weight, bias, buffer[: stop - start]))
        yield slice(start, stop), h, logits, None if second is None else second[: stop - start]


def chunk_backward(ops: RowOps, logits: torch.Tensor, spare: Optional[torch.Tensor], targets, row_max, log_sum,
                   entropy, coef_logprob: torch.Tensor, coef_entropy: torch.Tensor, temperature: float,
                   transform: LogitTransform, outside: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d(loss)/d(h @ W.T + b) of one chunk ``[rows, V]``, from the row backend's d(loss)/d(transformed logits).

    Without a soft-cap it overwrites ``logits`` (a scale folds into the coefficients: the row
    gradient is linear in them); with one it is written into ``spare`` and multiplied by the
    cap's derivative, which reads (and consumes) ``logits``.
    """
    if transform.scale is not None and not transform.needs_spare:
        coef_logprob, coef_entropy = coef_logprob * transform.scale, coef_entropy * transform.scale
    logits3 = logits.view(1, logits.shape[0], logits.shape[1])
    out = logits if not transform.needs_spare else spare
    ops.backward(logits3, targets, row_max, log_sum, entropy, coef_logprob.contiguous(), coef_entropy.contiguous(),
                 temperature, out.view(logits3.shape), outside)
    if transform.needs_spare:
        transform.chain_(out, logits)
    return out


class PPOPass:
    """Per-token results of the plain PPO pass and, when asked, the input gradients."""

    def __init__(self, hidden2d, weight, bias, x: LossInputs, ops: RowOps, chunk: int,
                 needs: Tuple[bool, bool, bool], process_group=None, transform: LogitTransform = IDENTITY):
        n_rows = hidden2d.shape[0]
        dtype = result_dtype(hidden2d)
        empty = lambda: torch.empty(n_rows, dtype=dtype, device=hidden2d.device)
        self.logprobs, self.entropy, self.ratio = empty(), empty(), empty()
        self.pg, self.kl, self.token_loss = empty(), empty(), empty()  # pg and the loss · e^−log_scale
        self.log_scale, self.kl_log_scale = empty(), empty()  # kl · e^−kl_log_scale
        grads = Gradients(hidden2d, weight, needs, process_group)
        for span, h, logits, spare in chunks(hidden2d, weight, bias, chunk, transform, spare=grads.any):
            logits3 = logits.view(1, logits.shape[0], logits.shape[1])
            targets = x.targets[span]
            res = ops.forward(
                logits3, targets, x.advantages[span],
                None if x.old_logprobs is None else x.old_logprobs[span],
                None if x.ref_logprobs is None else x.ref_logprobs[span],
                x.params,
            )
            for name in ("logprobs", "entropy", "ratio", "pg", "kl", "log_scale", "kl_log_scale"):
                getattr(self, name)[span] = getattr(res, name)
            self.token_loss[span] = res.loss
            if not grads.any:
                continue
            w = x.weights[span]
            # Masked rows may hold NaN in g (a banned placeholder target): keep them out of d(logits).
            coef_logprob = torch.where(x.valid[span], res.dlogp * w * torch.exp(res.log_scale),
                                       torch.zeros_like(res.dlogp))
            coef_entropy = x.params.entropy_coef * w
            # d(loss)/d(logits) overwrites the logits (or the spare buffer): both are ours and used only here.
            dlogits = chunk_backward(ops, logits, spare, targets, res.row_max, res.log_sum, res.entropy, coef_logprob,
                                     coef_entropy, x.params.temperature, transform, res.outside)
            grads.add(span, dlogits, h)
        self.grad_hidden, self.grad_weight, self.grad_bias = grads.finish()

    def loss(self, x: LossInputs) -> torch.Tensor:
        token_loss = torch.where(x.valid, self.token_loss, torch.zeros_like(self.token_loss))
        log_scale = torch.where(x.valid, self.log_scale, torch.zeros_like(self.log_scale))
        return scaled_sum(x.weights.to(token_loss.dtype) * token_loss, log_scale)

    def per_token(self) -> tuple:
        """(lp, H, ratio, pg, kl, log_scale, kl_log_scale) ``[N]``, what :func:`.functional.fused_output` takes."""
        return self.logprobs, self.entropy, self.ratio, self.pg, self.kl, self.log_scale, self.kl_log_scale


class FusedLinearPPOLoss(torch.autograd.Function):
    """Forward: the chunked pass with gradients; backward: scale them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, x: LossInputs, ops, chunk, process_group,
                transform: LogitTransform = IDENTITY):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        p = PPOPass(hidden2d, weight, bias, x, ops, chunk, needs, process_group, transform)
        ctx.grads = (p.grad_hidden, p.grad_weight, p.grad_bias)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        outputs = p.per_token()
        ctx.mark_non_differentiable(*outputs)
        return (p.loss(x),) + outputs

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
        return tuple(scaled) + (None,) * 5


def sequence_lengths(sequences: Sequences) -> List[int]:
    """The number of rows of each sequence, in order (sequences without rows left out)."""
    return torch.unique_consecutive(sequences.index, return_counts=True)[1].tolist()


def sequence_spans(lengths: List[int], chunk: int) -> Optional[List[slice]]:
    """Spans of at most ``chunk`` rows that hold whole sequences (consecutive, in order), or None when there
    are none or a sequence is longer than ``chunk`` (its coefficients would wait for rows of another chunk)."""
    if not lengths or max(lengths) > chunk:
        return None
    spans, start, stop = [], 0, 0
    for length in lengths:
        if stop + length - start > chunk:
            spans.append(slice(start, stop))
            start = stop
        stop += length
    spans.append(slice(start, stop))
    return spans


def _local_sequences(sequences: Optional[Sequences], span: slice) -> Optional[Sequences]:
    """The sequences of the rows of ``span`` (whole sequences, see :func:`sequence_spans`), numbered from 0."""
    if sequences is None or span.stop <= span.start:
        return None
    index = sequences.index[span]
    first = int(index[0])
    return Sequences(index - first, int(index[-1]) - first + 1)


def _token_coefficients(lp: torch.Tensor, entropy: torch.Tensor, x: LossInputs, span: slice,
                        sequences: Optional[Sequences] = None):
    """(d(Σ w·ℓ)/d lp, −d(Σ w·ℓ)/d H) of the tokens in ``span``, from their own (lp, H) and, for the
    sequence-level options, those of the other tokens of their sequences (``sequences``: all in ``span``)."""
    with torch.enable_grad():
        lp = lp.detach().requires_grad_(True)
        entropy = entropy.detach().requires_grad_(True)
        loss = weighted_token_loss(lp, entropy, x, span, sequences)[3]
        d_lp, d_h = torch.autograd.grad(loss, (lp, entropy), allow_unused=True)
    valid, zeros = x.valid[span], torch.zeros_like(lp)
    d_lp = zeros if d_lp is None else d_lp
    d_h = zeros if d_h is None else d_h
    # a masked row may hold NaN (a banned placeholder target): keep it out of d(logits), as the plain pass does
    return torch.where(valid, d_lp, zeros), torch.where(valid, -d_h, zeros)


class FusedLinearTokenLoss(torch.autograd.Function):
    """A variant in one pass: per chunk the row statistics, the chunk's coefficients, d(logits) and the input
    gradients. ``spans``: chunks of whole sequences (:func:`sequence_spans`) for a sequence-level option, None
    for a token-local one. The forward returns (carrier, lp, H): the caller computes the loss from lp and H
    (no graph) and adds the carrier, a 0 whose backward scales the stored gradients by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, x: LossInputs, ops: RowOps, chunk: int, process_group,
                transform: LogitTransform = IDENTITY, spans: Optional[List[slice]] = None):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        n_rows = hidden2d.shape[0]
        dtype = result_dtype(hidden2d)
        lp = torch.zeros(n_rows, dtype=dtype, device=hidden2d.device)
        entropy = torch.zeros_like(lp)
        grads = Gradients(hidden2d, weight, needs, process_group)
        temperature = float(x.options.temperature)
        for span, h, logits, spare in chunks(hidden2d, weight, bias, chunk, transform, spare=grads.any, spans=spans):
            targets = x.targets[span]
            stats = ops.logprobs(logits.view(1, logits.shape[0], logits.shape[1]), targets, temperature, True)
            lp[span], entropy[span] = stats.logprobs, stats.entropy
            if not grads.any:
                continue
            local = _local_sequences(x.sequences, span) if spans is not None else None
            coef_logprob, coef_entropy = _token_coefficients(lp[span], entropy[span], x, span, local)
            dlogits = chunk_backward(ops, logits, spare, targets, stats.row_max, stats.log_sum, entropy[span],
                                     coef_logprob, coef_entropy, temperature, transform, stats.outside)
            grads.add(span, dlogits, h)
        ctx.grads = grads.finish()
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lp, entropy)
        return torch.zeros((), dtype=dtype, device=hidden2d.device), lp, entropy

    @staticmethod
    def backward(ctx, grad_carrier, *_unused):
        return FusedLinearPPOLoss.backward(ctx, grad_carrier) + (None,)  # and none for ``spans``


def stats_pass(hidden2d, weight, bias, targets: torch.Tensor, temperature: float, ops: RowOps, chunk: int,
               with_entropy: bool, transform: LogitTransform = IDENTITY) -> RowStats:
    """(lp, H or None, m, log s) ``[N]`` of transform(``hidden @ W.T (+ b)``), chunk by chunk (no gradient work)."""
    n_rows = hidden2d.shape[0]
    dtype = result_dtype(hidden2d)
    out = [torch.zeros(n_rows, dtype=dtype, device=hidden2d.device) for _ in RowStats._fields]
    sharded = False
    for span, _, logits, _ in chunks(hidden2d, weight, bias, chunk, transform):
        stats = ops.logprobs(logits.view(1, logits.shape[0], logits.shape[1]), targets[span], float(temperature),
                             with_entropy)
        sharded = stats.outside is not None
        for buffer, value in zip(out, stats):
            if value is not None:
                buffer[span] = value
    return RowStats(out[0], out[1] if with_entropy else None, out[2], out[3], out[4] if sharded else None)


class FusedLinearLogprobs(torch.autograd.Function):
    """(lp, H) ``[N]`` of transform(``hidden @ W.T (+ b)``), differentiable; the backward recomputes each chunk's
    logits."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets, temperature: float, ops: RowOps, chunk: int, process_group,
                transform: LogitTransform = IDENTITY):
        stats = stats_pass(hidden2d, weight, bias, targets, temperature, ops, chunk, True, transform)
        ctx.save_for_backward(hidden2d, weight, bias, targets, stats.row_max, stats.log_sum, stats.entropy,
                              stats.outside)
        ctx.temperature, ctx.ops, ctx.chunk, ctx.process_group = temperature, ops, chunk, process_group
        ctx.transform = transform
        return stats.logprobs, stats.entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden2d, weight, bias, targets, row_max, log_sum, entropy, outside = ctx.saved_tensors
        zeros = torch.zeros_like(entropy)
        coef_logprob = zeros if grad_logprobs is None else grad_logprobs.to(torch.float32)
        coef_entropy = zeros if grad_entropy is None else (-grad_entropy).to(torch.float32)  # dH/dx = −p(log p + H)
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        grads = Gradients(hidden2d, weight, needs, ctx.process_group)
        for span, h, logits, spare in chunks(hidden2d, weight, bias, ctx.chunk, ctx.transform, spare=True):
            dlogits = chunk_backward(ctx.ops, logits, spare, targets[span], row_max[span], log_sum[span],
                                     entropy[span], coef_logprob[span], coef_entropy[span], ctx.temperature,
                                     ctx.transform, None if outside is None else outside[span])
            grads.add(span, dlogits, h)
        d_hidden, d_weight, d_bias = grads.finish()
        dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        out = tuple(None if g is None else g.to(dtype) for g, dtype in zip((d_hidden, d_weight, d_bias), dtypes))
        return out + (None,) * 6
