"""The eager PyTorch truth of the contract (docs/contract.md): the baseline for every test and benchmark.

Two layers, both plain PyTorch:

* the differentiable math (``selective_logprobs_entropy``, ``per_token_loss``,
  ``ppo_loss``), which autograd differentiates; this is the ``"eager"`` backend;
* the kernel contract in closed form (``token_forward``, ``token_backward``,
  ``token_logprobs``): exactly what a fused backend computes per row, written so a
  kernel can be compared against it term by term.

Shapes: ``N`` rows (tokens), ``V`` vocabulary. Logits of any float dtype are upcast
to fp32 (fp64 stays fp64, for gradcheck).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import backends
from ..backends.rows import RowOps, RowParams, RowStats, TokenResults
from .aggregation import loss_metrics


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def selective_logprobs_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of each target, entropy, row max and log-sum; differentiable in lp and H.

    logits ``[..., V]``, targets ``[...]`` (valid ids). Returns ``(lp, H, m, log s)`` ``[...]``
    with x = logits / τ, m = max x (0 for a row without a finite maximum), s = Σ exp(x − m).
    """
    x = logits.to(_compute_dtype(logits)) / temperature
    # Centre on the row max: lp = (x_y − m) − log s and H = log s − Σ p·(x − m) have no
    # cancellation between large numbers (x_y − lse or lse − Σ p·x lose |lse|·ulp).
    row_max = x.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    z = x - row_max
    log_s = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - log_s
    p = torch.exp(z - log_s.unsqueeze(-1))
    # A −inf logit (banned token) has p = 0; replace it by 0 in Σ p·z so that
    # 0·(−inf) never makes a NaN, in the value or in the gradient.
    z_finite = torch.where(z == float("-inf"), torch.zeros_like(z), z)
    entropy = log_s - (p * z_finite).sum(-1)
    return lp, entropy, row_max.squeeze(-1), log_s


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int) -> torch.Tensor:
    """KL estimator (per-token math of the contract) from δ = ref − lp; differentiable in ``logprobs``."""
    delta = ref_logprobs - logprobs
    k2 = 0.5 * delta * delta
    if estimator == 0:  # k1
        return -delta
    if estimator == 1:  # k2
        return k2
    k3 = torch.exp(delta) - delta - 1.0
    if estimator == 2:  # k3
        return k3
    return k2 + (k3 - k2).detach()  # k3+: value of k3, gradient of k2


def per_token_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    params: RowParams,
) -> Dict[str, torch.Tensor]:
    """ℓ = pg + β·kl − η·H per token, with its parts; differentiable in lp and H."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - params.clip_eps_low, 1.0 + params.clip_eps_high)
    pg = torch.maximum(-advantages * ratio, -advantages * clipped)
    if params.has_dual_clip:
        pg = torch.where(advantages < 0, torch.minimum(pg, -params.dual_clip * advantages), pg)
    if params.has_ref:
        kl = kl_estimate(logprobs, ref_logprobs, params.kl_estimator)
    else:
        kl = torch.zeros_like(logprobs)
    loss = pg + params.kl_coef * kl - params.entropy_coef * entropy
    return {"loss": loss, "pg": pg, "kl": kl, "ratio": ratio, "log_ratio": log_ratio}


# ----------------------------------------------------------------------------------
# The kernel contract in closed form (the gradient section of the contract). Rows are the flattened tokens.
# ----------------------------------------------------------------------------------


def surrogate_active(ratio: torch.Tensor, advantages: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Where the unclipped branch −A·r carries the gradient."""
    inactive = ((advantages > 0) & (ratio > 1.0 + params.clip_eps_high)) | (
        (advantages < 0) & (ratio < 1.0 - params.clip_eps_low)
    )
    if params.has_dual_clip:
        inactive = inactive | ((advantages < 0) & (ratio > params.dual_clip))
    return ~inactive


def kl_grad(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int) -> torch.Tensor:
    """d kl / d lp for each estimator."""
    if estimator == 0:
        return torch.ones_like(logprobs)
    if estimator == 2:
        return 1.0 - torch.exp(ref_logprobs - logprobs)
    return logprobs - ref_logprobs  # k2 and k3+


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
    logits = logits.reshape(-1, logits.shape[-1])
    lp, entropy, row_max, log_sum = selective_logprobs_entropy(logits, targets.reshape(-1), params.temperature)
    return token_math(lp, entropy, row_max, log_sum, advantages, old_logprobs, ref_logprobs, params)


@torch.no_grad()
def token_math(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    params: RowParams,
) -> TokenResults:
    """The per-token part of the forward, from each row's lp, H, m and log s ``[N]``."""
    parts = per_token_loss(logprobs, entropy, advantages, old_logprobs, ref_logprobs, params)
    ratio = parts["ratio"]
    dlogp = torch.where(surrogate_active(ratio, advantages, params), -advantages * ratio, 0.0)
    if params.has_ref and params.kl_coef != 0.0:
        dlogp = dlogp + params.kl_coef * kl_grad(logprobs, ref_logprobs, params.kl_estimator)
    return TokenResults(logprobs, entropy, row_max, log_sum, ratio, parts["pg"], parts["kl"], parts["loss"], dlogp)


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
) -> torch.Tensor:
    """d(loss)/d(logits) ``[N, V]`` in the logits' dtype, recomputing p from the logits.

    ``coef_logprob`` = d(loss)/d lp per row (g times aggregation weight times upstream
    grad); ``coef_entropy`` = η times the same weight: the entropy bonus contributes
    η·p_j·(log p_j + H) to d(loss)/d x_j. A target of −1 means the row's target lies
    outside these logits (another vocabulary shard): no one-hot term.
    """
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1])
    x = logits.to(_compute_dtype(logits)) / temperature
    log_p = (x - row_max.unsqueeze(-1)) - log_sum.unsqueeze(-1)
    p = torch.exp(log_p)
    columns = torch.arange(x.shape[-1], device=x.device)
    one_hot = (columns == targets.reshape(-1, 1)).to(x.dtype)
    entropy_term = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(p))
    grad = coef_logprob.unsqueeze(-1) * (one_hot - p) + coef_entropy.unsqueeze(-1) * entropy_term
    return (grad / temperature).to(logits.dtype).reshape(shape)


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool) -> RowStats:
    """No-grad log-probs (and entropy) and row statistics for logits ``[N, V]``: the ``rf.logprobs`` pass."""
    logits = logits.reshape(-1, logits.shape[-1])
    lp, entropy, row_max, log_sum = selective_logprobs_entropy(logits, targets.reshape(-1), temperature)
    return RowStats(lp, entropy if with_entropy else None, row_max, log_sum)


def ppo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    params: RowParams,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """The eager backend: loss, per-token lp and H (detached, 0 where masked), metrics.

    Inputs are already validated and broadcast: logits ``[..., V]``; targets, valid,
    weights, advantages and the log-prob tensors ``[...]``; masked targets are valid ids.
    """
    lp, entropy, _, _ = selective_logprobs_entropy(logits, targets, params.temperature)
    # A masked row's placeholder target may be a banned (−inf) token: zero lp and H there
    # so nothing downstream (exp(ref − lp) in k3) turns it into a NaN gradient.
    zeros = torch.zeros_like(lp)
    lp, entropy = torch.where(valid, lp, zeros), torch.where(valid, entropy, zeros)
    parts = per_token_loss(lp, entropy, advantages, old_logprobs, ref_logprobs, params)
    token_loss = torch.where(valid, parts["loss"], torch.zeros_like(parts["loss"]))
    loss = (weights.to(token_loss.dtype) * token_loss).sum()
    if loss.dtype != torch.float64:  # fp64 stays fp64, for gradcheck
        loss = loss.to(torch.float32)
    metrics = loss_metrics(
        valid, advantages, parts["ratio"].detach(), parts["log_ratio"].detach(),
        parts["pg"].detach(), parts["kl"].detach(), entropy.detach(), params,
    )
    lp_out, entropy_out = lp.detach(), entropy.detach()
    if lp_out.dtype != torch.float64:
        lp_out, entropy_out = lp_out.to(torch.float32), entropy_out.to(torch.float32)
    return loss, lp_out, entropy_out, metrics


def _reference_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out):
    grad = token_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature)
    out.copy_(grad.view(out.shape))


REFERENCE_OPS = RowOps(token_forward, _reference_backward, token_logprobs)
"""The closed-form reference as a row backend (vocab-parallel and fused-linear with backend='eager', tests)."""
backends.register("eager", REFERENCE_OPS)
