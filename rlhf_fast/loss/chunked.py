"""The chunk engine of the fused-linear loss: logits ``hidden @ W.T (+ b)`` one ``[chunk, V]``
block at a time, through one reusable buffer, and the gradients of hidden, weight and bias
accumulated chunk by chunk (see :mod:`rlhf_fast.loss.fused_linear` for what the caller sees).

One walk (:func:`walk`) does it for every pass: per chunk, the logits (transformed), then a
*step* that gives the chunk's row statistics and, when gradients are wanted, the coefficients
c_lp = d(loss)/d lp and c_H = −d(loss)/dH of its rows; the walk then writes d(logits) with the
row backend's backward and adds the chunk's share of the input gradients. The steps are what
varies:

* :class:`FusedLinearPPOLoss` (:class:`PPOPass`) — the plain PPO loss with its gradients formed
  in the forward (every aggregation is linear, so each token's weight is known before any logit
  is seen): the step is the row backend's forward, c_lp = g·w, c_H = η·w; the backward only
  scales the gradients by the upstream scalar;
* :class:`FusedLinearTokenLoss` — the same single pass for the variants: the step is the
  statistics pass, and the chunk's (lp, H) give its coefficients at once (autograd of the
  per-token math on the chunk's ``[rows]`` slice), for a token-local option (CISPO, SAPO, clamps,
  token-level rollout correction) on any chunks, for a sequence-level one (GSPO, sequence-level
  rollout correction) on chunks of whole sequences (:func:`.chunk_size.sequence_spans`);
* :func:`stats_pass` — the statistics alone, no gradient;
* :class:`FusedLinearLogprobs` — differentiable (lp, H): :func:`stats_pass` in the forward, and
  a backward whose step reads the saved statistics and the upstream gradients of (lp, H): the
  sequence-level variants' path when a sequence is longer than a chunk.

The model's :class:`~.logit_transform.LogitTransform` (a logit scale, tanh soft-capping) applies
to each chunk's logits before the row backend, and its chain rule to each chunk's d(logits).
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..backends.rows import RowOps, RowStats
from .aggregation import scaled_sum
from .chunk_size import local_sequences
from .inputs import LossInputs
from .logit_transform import IDENTITY, LogitTransform
from .token_loss import weighted_token_loss


def result_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _logits_chunk(h: torch.Tensor, weight: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    # mm then add (rather than addmm) rounds exactly like `hidden @ weight.T + bias`.
    torch.mm(h, weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


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
        self.mixed_matmul = True  # False once the CUDA matmul into an fp32 output turns out unsupported

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight_grad is not None or self.bias is not None

    def add(self, span: slice, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        """One chunk: d(hidden)[span] = dlogits @ W, d(W) += dlogitsᵀ @ h, d(b) += Σ dlogits."""
        if self.sum_hidden:
            self._accumulate_mm(self.hidden[span].zero_(), dlogits, self.weight)
        elif self.hidden is not None:
            torch.mm(dlogits, self.weight, out=self.hidden[span])
        if self.weight_grad is not None:
            self._accumulate_mm(self.weight_grad, dlogits.t(), h)
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0, dtype=self.acc_dtype))

    def _accumulate_mm(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` with ``acc`` fp32 (fp64 for fp64 inputs) and a, b in the compute dtype."""
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
            return
        if a.is_cuda and self.mixed_matmul:
            try:  # bf16/fp16 tensor-core matmul that accumulates into fp32 directly
                torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
                return
            except (RuntimeError, NotImplementedError):
                self.mixed_matmul = False
        # CPU has no mixed-dtype matmul: upcast the chunk (bounded: [chunk, V] + [chunk, H]).
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))

    def finish(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.hidden is not None and self.process_group is not None and self.hidden.shape[0] > 0:
            dist.all_reduce(self.hidden, group=self.process_group)  # Σ_rank dlogits_rank·W_rank
        return self.hidden, self.weight_grad, self.bias


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


# ----------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------


class ChunkStep(NamedTuple):
    """What a step gives the walk for one chunk's rows ``[rows]``: the statistics its backward reads and the
    coefficients c_lp = d(loss)/d lp, c_H = −d(loss)/dH (None when the walk wants no gradient)."""

    row_max: torch.Tensor
    log_sum: torch.Tensor
    entropy: torch.Tensor
    outside: Optional[torch.Tensor]
    coef_logprob: Optional[torch.Tensor] = None
    coef_entropy: Optional[torch.Tensor] = None


Step = Callable[[slice, torch.Tensor, bool], Optional[ChunkStep]]
"""(span, the chunk's logits ``[1, rows, V]``, whether gradients are wanted) -> its :class:`ChunkStep`."""


def walk(hidden2d: torch.Tensor, weight: torch.Tensor, bias, chunk: int, step: Step, *, ops: RowOps,
         targets: torch.Tensor, temperature: float, transform: LogitTransform = IDENTITY,
         grads: Optional[Gradients] = None, spans: Optional[List[slice]] = None):
    """Every chunk once: its logits, ``step``, and with ``grads`` (wanting any gradient) d(logits) from the step's
    coefficients and the chunk's share of the input gradients, which it returns (d(hidden) summed over ranks)."""
    with_grad = grads is not None and grads.any
    for span, h, logits, spare in chunks(hidden2d, weight, bias, chunk, transform, spare=with_grad, spans=spans):
        result = step(span, logits.view(1, logits.shape[0], logits.shape[1]), with_grad)
        if not with_grad:
            continue
        dlogits = chunk_backward(ops, logits, spare, targets[span], result.row_max, result.log_sum, result.entropy,
                                 result.coef_logprob, result.coef_entropy, temperature, transform, result.outside)
        grads.add(span, dlogits, h)
    return None if grads is None else grads.finish()


def _scale_stored(ctx, grad_loss) -> tuple:
    """The gradients formed in the forward (``ctx.grads``), times the upstream scalar, in the inputs' dtypes."""
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
    return tuple(scaled)


# ----------------------------------------------------------------------------------
# The passes: each a step
# ----------------------------------------------------------------------------------


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

        def step(span: slice, logits3: torch.Tensor, with_grad: bool) -> ChunkStep:
            res = ops.forward(
                logits3, x.targets[span], x.advantages[span],
                None if x.old_logprobs is None else x.old_logprobs[span],
                None if x.ref_logprobs is None else x.ref_logprobs[span],
                x.params,
            )
            for name in ("logprobs", "entropy", "ratio", "pg", "kl", "log_scale", "kl_log_scale"):
                getattr(self, name)[span] = getattr(res, name)
            self.token_loss[span] = res.loss
            if not with_grad:
                return None
            w = x.weights[span]
            # Masked rows may hold NaN in g (a banned placeholder target): keep them out of d(logits).
            coef_logprob = torch.where(x.valid[span], res.dlogp * w * torch.exp(res.log_scale),
                                       torch.zeros_like(res.dlogp))
            return ChunkStep(res.row_max, res.log_sum, res.entropy, res.outside, coef_logprob,
                             x.params.entropy_coef * w)

        grads = Gradients(hidden2d, weight, needs, process_group)
        # d(loss)/d(logits) overwrites the logits (or the spare buffer): both are the walk's and used only there.
        self.grad_hidden, self.grad_weight, self.grad_bias = walk(
            hidden2d, weight, bias, chunk, step, ops=ops, targets=x.targets, temperature=x.params.temperature,
            transform=transform, grads=grads)

    def loss(self, x: LossInputs) -> torch.Tensor:
        token_loss = torch.where(x.valid, self.token_loss, torch.zeros_like(self.token_loss))
        log_scale = torch.where(x.valid, self.log_scale, torch.zeros_like(self.log_scale))
        return scaled_sum(x.weights.to(token_loss.dtype) * token_loss, log_scale)

    def per_token(self) -> tuple:
        """(lp, H, ratio, pg, kl, log_scale, kl_log_scale) ``[N]``, what :func:`.token_loss.fused_output` takes."""
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
        return _scale_stored(ctx, grad_loss) + (None,) * 5


def _token_coefficients(lp: torch.Tensor, entropy: torch.Tensor, x: LossInputs, span: slice,
                        sequences=None):
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
    gradients. ``spans``: chunks of whole sequences (:func:`.chunk_size.sequence_spans`) for a sequence-level
    option, None for a token-local one. The forward returns (carrier, lp, H): the caller computes the loss from
    lp and H (no graph) and adds the carrier, a 0 whose backward scales the stored gradients by the upstream
    scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, x: LossInputs, ops: RowOps, chunk: int, process_group,
                transform: LogitTransform = IDENTITY, spans: Optional[List[slice]] = None):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        n_rows = hidden2d.shape[0]
        dtype = result_dtype(hidden2d)
        lp = torch.zeros(n_rows, dtype=dtype, device=hidden2d.device)
        entropy = torch.zeros_like(lp)
        temperature = float(x.options.temperature)

        def step(span: slice, logits3: torch.Tensor, with_grad: bool) -> Optional[ChunkStep]:
            stats = ops.logprobs(logits3, x.targets[span], temperature, True)
            lp[span], entropy[span] = stats.logprobs, stats.entropy
            if not with_grad:
                return None
            local = local_sequences(x.sequences, span) if spans is not None else None
            coef_logprob, coef_entropy = _token_coefficients(lp[span], entropy[span], x, span, local)
            return ChunkStep(stats.row_max, stats.log_sum, entropy[span], stats.outside, coef_logprob, coef_entropy)

        grads = Gradients(hidden2d, weight, needs, process_group)
        ctx.grads = walk(hidden2d, weight, bias, chunk, step, ops=ops, targets=x.targets, temperature=temperature,
                         transform=transform, grads=grads, spans=spans)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lp, entropy)
        return torch.zeros((), dtype=dtype, device=hidden2d.device), lp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_carrier, *_unused):
        return _scale_stored(ctx, grad_carrier) + (None,) * 6  # and none for ``spans``


def stats_pass(hidden2d, weight, bias, targets: torch.Tensor, temperature: float, ops: RowOps, chunk: int,
               with_entropy: bool, transform: LogitTransform = IDENTITY) -> RowStats:
    """(lp, H or None, m, log s) ``[N]`` of transform(``hidden @ W.T (+ b)``), chunk by chunk (no gradient work)."""
    n_rows = hidden2d.shape[0]
    dtype = result_dtype(hidden2d)
    out = [torch.zeros(n_rows, dtype=dtype, device=hidden2d.device) for _ in RowStats._fields]
    sharded = []

    def step(span: slice, logits3: torch.Tensor, with_grad: bool) -> None:
        stats = ops.logprobs(logits3, targets[span], float(temperature), with_entropy)
        sharded.append(stats.outside is not None)
        for buffer, value in zip(out, stats):
            if value is not None:
                buffer[span] = value

    walk(hidden2d, weight, bias, chunk, step, ops=ops, targets=targets, temperature=temperature, transform=transform)
    outside = out[4] if sharded and sharded[-1] else None
    return RowStats(out[0], out[1] if with_entropy else None, out[2], out[3], outside)


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

        def step(span: slice, logits3: torch.Tensor, with_grad: bool) -> ChunkStep:
            return ChunkStep(row_max[span], log_sum[span], entropy[span], None if outside is None else outside[span],
                             coef_logprob[span], coef_entropy[span])

        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        grads = Gradients(hidden2d, weight, needs, ctx.process_group)
        d_hidden, d_weight, d_bias = walk(hidden2d, weight, bias, ctx.chunk, step, ops=ctx.ops, targets=targets,
                                          temperature=ctx.temperature, transform=ctx.transform, grads=grads)
        dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        out = tuple(None if g is None else g.to(dtype) for g, dtype in zip((d_hidden, d_weight, d_bias), dtypes))
        return out + (None,) * 6
