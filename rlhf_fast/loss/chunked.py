"""The chunk machinery of the fused-linear loss: logits ``hidden @ W.T (+ b)`` one ``[chunk, V]``
block at a time, through one reusable buffer, and the gradients of hidden, weight and bias
accumulated chunk by chunk (see :mod:`rlhf_fast.loss.fused_linear` for what the caller sees).

Two passes:

* :class:`FusedLinearPPOLoss` — the plain PPO loss with its gradients formed in the forward
  (every aggregation is linear, so each token's weight is known before any logit is seen);
  the backward only scales them by the upstream scalar;
* :class:`FusedLinearLogprobs` — differentiable (lp, H): a statistics pass in the forward,
  and a backward that recomputes each chunk's logits and writes d(logits) with the
  coefficients of any function of (lp, H): what the policy-loss variants and §8 need.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..backends.rows import RowOps, RowStats
from .inputs import LossInputs

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


def chunks(hidden2d: torch.Tensor, weight: torch.Tensor, bias, chunk: int):
    """``(span, h, logits [rows, V])`` per chunk of rows; ``logits`` lives in one reused buffer."""
    n_rows, vocab = hidden2d.shape[0], weight.shape[0]
    buffer = torch.empty(max(min(chunk, n_rows), 1), vocab, dtype=hidden2d.dtype, device=hidden2d.device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        h = hidden2d[start:stop]
        yield slice(start, stop), h, _logits_chunk(h, weight, bias, buffer[: stop - start])


class PPOPass:
    """Per-token results of the plain PPO pass and, when asked, the input gradients."""

    def __init__(self, hidden2d, weight, bias, x: LossInputs, ops: RowOps, chunk: int,
                 needs: Tuple[bool, bool, bool], process_group=None):
        n_rows = hidden2d.shape[0]
        dtype = result_dtype(hidden2d)
        empty = lambda: torch.empty(n_rows, dtype=dtype, device=hidden2d.device)
        self.logprobs, self.entropy, self.ratio = empty(), empty(), empty()
        self.pg, self.kl, self.token_loss = empty(), empty(), empty()
        grads = Gradients(hidden2d, weight, needs, process_group)
        for span, h, logits in chunks(hidden2d, weight, bias, chunk):
            logits3 = logits.view(1, logits.shape[0], logits.shape[1])
            targets = x.targets[span]
            res = ops.forward(
                logits3, targets, x.advantages[span],
                None if x.old_logprobs is None else x.old_logprobs[span],
                None if x.ref_logprobs is None else x.ref_logprobs[span],
                x.params,
            )
            for name in ("logprobs", "entropy", "ratio", "pg", "kl"):
                getattr(self, name)[span] = getattr(res, name)
            self.token_loss[span] = res.loss
            if not grads.any:
                continue
            w = x.weights[span]
            # Masked rows may hold NaN in g (a banned placeholder target): keep them out of d(logits).
            coef_logprob = torch.where(x.valid[span], res.dlogp * w, torch.zeros_like(res.dlogp)).contiguous()
            coef_entropy = (x.params.entropy_coef * w).contiguous()
            # d(loss)/d(logits) overwrites the logits: the buffer is ours and used only here.
            ops.backward(logits3, targets, res.row_max, res.log_sum, res.entropy, coef_logprob, coef_entropy,
                         x.params.temperature, logits3)
            grads.add(span, logits, h)
        self.grad_hidden, self.grad_weight, self.grad_bias = grads.finish()

    def loss(self, x: LossInputs) -> torch.Tensor:
        token_loss = torch.where(x.valid, self.token_loss, torch.zeros_like(self.token_loss))
        return (x.weights.to(token_loss.dtype) * token_loss).sum()


class FusedLinearPPOLoss(torch.autograd.Function):
    """Forward: the chunked pass with gradients; backward: scale them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, x: LossInputs, ops, chunk, process_group):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        p = PPOPass(hidden2d, weight, bias, x, ops, chunk, needs, process_group)
        ctx.grads = (p.grad_hidden, p.grad_weight, p.grad_bias)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        outputs = (p.logprobs, p.entropy, p.ratio, p.pg, p.kl)
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
        return tuple(scaled) + (None,) * 4


def stats_pass(hidden2d, weight, bias, targets: torch.Tensor, temperature: float, ops: RowOps, chunk: int,
               with_entropy: bool) -> RowStats:
    """(lp, H or None, m, log s) ``[N]`` of ``hidden @ W.T (+ b)``, chunk by chunk (no gradient work)."""
    n_rows = hidden2d.shape[0]
    dtype = result_dtype(hidden2d)
    out = [torch.zeros(n_rows, dtype=dtype, device=hidden2d.device) for _ in range(4)]
    for span, _, logits in chunks(hidden2d, weight, bias, chunk):
        stats = ops.logprobs(logits.view(1, logits.shape[0], logits.shape[1]), targets[span], float(temperature),
                             with_entropy)
        for buffer, value in zip(out, stats):
            if value is not None:
                buffer[span] = value
    return RowStats(out[0], out[1] if with_entropy else None, out[2], out[3])


class FusedLinearLogprobs(torch.autograd.Function):
    """(lp, H) ``[N]`` of ``hidden @ W.T (+ b)``, differentiable; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets, temperature: float, ops: RowOps, chunk: int, process_group):
        stats = stats_pass(hidden2d, weight, bias, targets, temperature, ops, chunk, True)
        ctx.save_for_backward(hidden2d, weight, bias, targets, stats.row_max, stats.log_sum, stats.entropy)
        ctx.temperature, ctx.ops, ctx.chunk, ctx.process_group = temperature, ops, chunk, process_group
        return stats.logprobs, stats.entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden2d, weight, bias, targets, row_max, log_sum, entropy = ctx.saved_tensors
        zeros = torch.zeros_like(entropy)
        coef_logprob = zeros if grad_logprobs is None else grad_logprobs.to(torch.float32)
        coef_entropy = zeros if grad_entropy is None else (-grad_entropy).to(torch.float32)  # dH/dx = −p(log p + H)
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        grads = Gradients(hidden2d, weight, needs, ctx.process_group)
        for span, h, logits in chunks(hidden2d, weight, bias, ctx.chunk):
            logits3 = logits.view(1, logits.shape[0], logits.shape[1])
            ctx.ops.backward(logits3, targets[span], row_max[span], log_sum[span], entropy[span],
                             coef_logprob[span].contiguous(), coef_entropy[span].contiguous(), ctx.temperature,
                             logits3)
            grads.add(span, logits, h)
        d_hidden, d_weight, d_bias = grads.finish()
        dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        out = tuple(None if g is None else g.to(dtype) for g, dtype in zip((d_hidden, d_weight, d_bias), dtypes))
        return out + (None,) * 5
