"""The eager PyTorch truth of the contract (docs/contract.md): the baseline for every test and benchmark.

Two layers, both plain PyTorch:

* the differentiable math: :func:`selective_logprobs_entropy` here, then the per-token loss that
  every backend shares (:func:`.token_loss.finish_token_loss`, on the per-token math of every
  policy-loss variant in :mod:`.policy`); :func:`ppo_loss` is the ``"eager"`` backend, which
  autograd differentiates;
* the row-kernel contract of the plain PPO loss in closed form (:func:`token_forward`,
  :func:`token_backward`, :func:`token_logprobs`): exactly what a fused backend computes per
  row, written so a kernel can be compared against it term by term (the per-token half of the
  forward is :func:`.token_loss.token_math`). It is also a row backend (``REFERENCE_OPS``,
  registered as ``"eager"``).

Shapes: ``N`` rows (tokens), ``V`` vocabulary. Logits of any float dtype are upcast to fp32
(fp64 stays fp64, for gradcheck).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import backends
from ..backends.rows import RowOps, RowParams, RowStats, TokenResults, check_gradient_out
from .aggregation import PPOLossOutput
from .inputs import LossInputs
from .token_loss import finish_token_loss, token_math


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def selective_logprobs_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of each target, entropy, row max and log-sum; differentiable in lp and H.

    logits ``[..., V]``, targets ``[...]`` (valid ids). Returns ``(lp, H, m, log s)`` ``[...]``
    with x = logits / τ, m = max x (−inf for a row of −inf only), s = Σ exp(x − m).
    With ``valid`` ``[...]``, masked rows are computed on zero logits: whatever they hold (−inf
    everywhere, NaN padding) gives finite values and an exactly zero gradient there.
    """
    x = logits.to(_compute_dtype(logits)) / temperature
    if valid is not None:
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    # Centre on the row max: lp = (x_y − m) − log s and H = log s − Σ p·(x − m) have no
    # cancellation between large numbers (x_y − lse or lse − Σ p·x lose |lse|·ulp).
    true_max = x.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(true_max), true_max, torch.zeros_like(true_max))  # keep it out of x − m
    z = x - row_max
    log_s = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - log_s.unsqueeze(-1))
    # An entry of probability 0 (a banned token) takes no gradient, not even 0·inf from an infinite
    # upstream coefficient (a term beyond fp32): it reaches the softmax's backward as a constant.
    z_live = torch.where(p.detach() == 0, z.detach(), z)
    y = targets.long().unsqueeze(-1)
    z_y = z.gather(-1, y)
    lp = z_y.squeeze(-1) - torch.logsumexp(z_live, dim=-1)
    # A confident target (p_y > 1/2, so z_y = 0, the row max): lp = −log1p(Σ_{j≠y} e^(z_j − z_y)) carries
    # d lp/dz_y = Σ_{j≠y} p_j into the gradient, where z_y − log s would give 1 − p_y, which cancels.
    confident = (lp > -math.log(2.0)).detach().unsqueeze(-1)
    others = confident & (torch.arange(z.shape[-1], device=z.device) != y) & (p.detach() > 0)
    rest = torch.exp(torch.where(others, z_live - z_y, torch.full_like(z, float("-inf")))).sum(-1)
    lp = torch.where(confident.squeeze(-1), -torch.log1p(rest), lp)
    # A −inf logit (banned token) has p = 0; replace it by 0 in Σ p·z so that
    # 0·(−inf) never makes a NaN, in the value or in the gradient.
    z_finite = torch.where(z == float("-inf"), torch.zeros_like(z), z)
    entropy = log_s - (p * z_finite).sum(-1)
    return lp, entropy, true_max.squeeze(-1), log_s


# ----------------------------------------------------------------------------------
# The kernel contract in closed form (the gradient section of the contract). Rows are the flattened tokens.
# ----------------------------------------------------------------------------------


@torch.no_grad()
def token_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    params: RowParams,
) -> TokenResults:
    """What a fused forward returns for logits ``[N, V]`` and per-row vectors ``[N]``."""
    stats = token_logprobs(logits, targets, params.temperature, with_entropy=True)
    return token_math(stats, advantages, old_logprobs, ref_logprobs, params)


@torch.no_grad()
def token_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    entropy: torch.Tensor,
    coef_logprob: torch.Tensor,
    coef_entropy: torch.Tensor,
    temperature: float,
    outside: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d(loss)/d(logits) ``[N, V]`` in the logits' dtype, recomputing p from the logits.

    ``coef_logprob`` = d(loss)/d lp per row (g times aggregation weight times upstream
    grad); ``coef_entropy`` = η times the same weight: the entropy bonus contributes
    η·p_j·(log p_j + H) to d(loss)/d x_j. A target of −1 means the row's target lies
    outside these logits (another vocabulary shard): no one-hot term. The one-hot factor
    1 − p_y of a confident target is Σ_{j≠y} p_j (+ ``outside`` [N], the probability on the
    other shards), which does not cancel; an entry with p_j = 0 is 0 whatever the coefficient.
    """
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1])
    x = logits.to(_compute_dtype(logits)) / temperature
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # a row of −inf only
    log_p = (x - shift.unsqueeze(-1)) - log_sum.unsqueeze(-1)
    p = torch.exp(log_p)
    columns = torch.arange(x.shape[-1], device=x.device)
    target = columns == targets.reshape(-1, 1)
    others = torch.where(target, torch.zeros_like(p), p).sum(-1)
    if outside is not None:
        others = others + outside
    p_y = (p * target).sum(-1)
    one_minus = torch.where(others < 0.5, others, 1.0 - p_y).unsqueeze(-1)  # 1 − p_y, no cancellation
    zero = torch.zeros_like(p)
    entropy_term = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), zero)
    onehot_term = torch.where(target, one_minus, -p)  # 1[j = y] − p_j
    c_lp = coef_logprob.unsqueeze(-1)
    grad = torch.where(onehot_term == 0, zero, c_lp * onehot_term) + coef_entropy.unsqueeze(-1) * entropy_term
    live = ((coef_logprob != 0) | (coef_entropy != 0)).unsqueeze(-1)  # a row without weight: exactly 0
    grad = torch.where(live, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return (grad / temperature).to(logits.dtype).reshape(shape)


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool) -> RowStats:
    """No-grad log-probs (and entropy) and row statistics for logits ``[N, V]``: the ``rf.logprobs`` pass."""
    logits = logits.reshape(-1, logits.shape[-1])
    lp, entropy, row_max, log_sum = selective_logprobs_entropy(logits, targets.reshape(-1), temperature)
    return RowStats(lp, entropy if with_entropy else None, row_max, log_sum)


def ppo_loss(logits: torch.Tensor, x: LossInputs) -> PPOLossOutput:
    """The eager backend: autograd through the plain-PyTorch math, any policy loss and correction.

    ``x`` are the prepared inputs (:func:`rlhf_fast.loss.inputs.prepare`) of logits ``[..., V]``.
    """
    valid = x.valid.view(x.shape)
    lp, entropy, _, _ = selective_logprobs_entropy(logits, x.targets.view(x.shape), x.options.temperature, valid)
    return finish_token_loss(lp.reshape(-1), entropy.reshape(-1), x)


def _reference_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out,
                        outside=None):
    check_gradient_out(logits, out)
    grad = token_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature,
                          outside)
    out.copy_(grad.view(out.shape))


REFERENCE_OPS = RowOps(token_forward, _reference_backward, token_logprobs)
"""The closed-form reference as a row backend (vocab-parallel and fused-linear with backend='eager', tests)."""
backends.register("eager", REFERENCE_OPS)
