"""The eager PyTorch truth of SPEC §2–§5: the baseline for every test and benchmark.

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

from .config import LossConfig, TokenResults


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def selective_logprobs_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of each target, entropy and log-sum-exp; differentiable.

    logits ``[..., V]``, targets ``[...]`` (valid ids). Returns ``(lp, H, lse)`` ``[...]``.
    """
    x = logits.to(_compute_dtype(logits)) / temperature
    # Centre on the row max: H = log s − Σ p·z with z = x − max has no cancellation
    # between large numbers (lse − Σ p·x loses |lse|·ulp, which can exceed fp32 tolerance).
    row_max = x.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    z = x - row_max
    log_s = torch.logsumexp(z, dim=-1)
    lse = row_max.squeeze(-1) + log_s
    lp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - log_s
    p = torch.exp(z - log_s.unsqueeze(-1))
    # A −inf logit (banned token) has p = 0; replace it by 0 in Σ p·z so that
    # 0·(−inf) never makes a NaN, in the value or in the gradient.
    z_finite = torch.where(z == float("-inf"), torch.zeros_like(z), z)
    entropy = log_s - (p * z_finite).sum(-1)
    return lp, entropy, lse


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int) -> torch.Tensor:
    """KL estimator of SPEC §2 from δ = ref − lp; differentiable in ``logprobs``."""
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
    cfg: LossConfig,
) -> Dict[str, torch.Tensor]:
    """ℓ = pg + β·kl − η·H per token, with its parts; differentiable in lp and H."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = torch.maximum(-advantages * ratio, -advantages * clipped)
    if cfg.has_dual_clip:
        pg = torch.where(advantages < 0, torch.minimum(pg, -cfg.dual_clip * advantages), pg)
    if cfg.has_ref:
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)
    else:
        kl = torch.zeros_like(logprobs)
    loss = pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy
    return {"loss": loss, "pg": pg, "kl": kl, "ratio": ratio, "log_ratio": log_ratio}


# ----------------------------------------------------------------------------------
# The kernel contract in closed form (SPEC §4). Rows are the flattened tokens.
# ----------------------------------------------------------------------------------


def surrogate_active(ratio: torch.Tensor, advantages: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Where the unclipped branch −A·r carries the gradient (SPEC §4)."""
    inactive = ((advantages > 0) & (ratio > 1.0 + cfg.clip_eps_high)) | (
        (advantages < 0) & (ratio < 1.0 - cfg.clip_eps_low)
    )
    if cfg.has_dual_clip:
        inactive = inactive | ((advantages < 0) & (ratio > cfg.dual_clip))
    return ~inactive


def kl_grad(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int) -> torch.Tensor:
    """d kl / d lp for each estimator (SPEC §4)."""
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
    cfg: LossConfig,
) -> TokenResults:
    """What a fused forward returns for logits ``[N, V]`` and per-row vectors ``[N]``."""
    logits = logits.reshape(-1, logits.shape[-1])
    lp, entropy, lse = selective_logprobs_entropy(logits, targets.reshape(-1), cfg.temperature)
    return token_math(lp, entropy, lse, advantages, old_logprobs, ref_logprobs, cfg)


@torch.no_grad()
def token_math(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    cfg: LossConfig,
) -> TokenResults:
    """The per-token part of the forward, from each row's lp, H and lse ``[N]``."""
    parts = per_token_loss(logprobs, entropy, advantages, old_logprobs, ref_logprobs, cfg)
    ratio = parts["ratio"]
    dlogp = torch.where(surrogate_active(ratio, advantages, cfg), -advantages * ratio, 0.0)
    if cfg.has_ref and cfg.kl_coef != 0.0:
        dlogp = dlogp + cfg.kl_coef * kl_grad(logprobs, ref_logprobs, cfg.kl_estimator)
    return TokenResults(logprobs, entropy, lse, ratio, parts["pg"], parts["kl"], parts["loss"], dlogp)


@torch.no_grad()
def token_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
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
    log_p = x - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    columns = torch.arange(x.shape[-1], device=x.device)
    one_hot = (columns == targets.reshape(-1, 1)).to(x.dtype)
    entropy_term = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(p))
    grad = coef_logprob.unsqueeze(-1) * (one_hot - p) + coef_entropy.unsqueeze(-1) * entropy_term
    return (grad / temperature).to(logits.dtype).reshape(shape)


@torch.no_grad()
def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """No-grad log-probs (and entropy) for logits ``[N, V]``: the ``rf.logprobs`` pass."""
    logits = logits.reshape(-1, logits.shape[-1])
    lp, entropy, _ = selective_logprobs_entropy(logits, targets.reshape(-1), temperature)
    return lp, (entropy if with_entropy else None)


# ----------------------------------------------------------------------------------
# Aggregation (SPEC §3) and metrics (SPEC §5): shared by every backend.
# ----------------------------------------------------------------------------------


def aggregation_weights(
    valid: torch.Tensor, loss_agg: str, global_num_tokens=None
) -> torch.Tensor:
    """Per-token weights w with loss = Σ w·ℓ; ``valid`` is a bool ``[...]`` mask.

    Every mode of SPEC §3 is linear in ℓ, so one weight per token describes it, and
    a backward only ever needs w (times the upstream gradient).
    """
    m = valid.to(torch.float32)
    if loss_agg == "token-mean":
        if global_num_tokens is None:
            denom = m.sum().clamp_min(1.0)
        elif isinstance(global_num_tokens, torch.Tensor):
            denom = global_num_tokens.to(device=m.device, dtype=torch.float32).clamp_min(1.0)
        else:
            denom = float(global_num_tokens)
        return m / denom
    num_seqs = m.shape[0]
    tokens_per_seq = m.sum(-1, keepdim=True)
    seqs_valid = (tokens_per_seq > 0).sum().to(torch.float32).clamp_min(1.0)
    if loss_agg == "seq-mean-token-sum":
        return m / seqs_valid
    if loss_agg == "seq-mean-token-mean":
        return m / (tokens_per_seq.clamp_min(1.0) * seqs_valid)
    if loss_agg == "seq-mean-token-sum-norm":
        return m / float(num_seqs * m.shape[1])
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


METRIC_NAMES = (
    "pg_loss",
    "kl",
    "entropy",
    "clipfrac",
    "clipfrac_lower",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "ratio_above",
    "ratio_below",
    "approx_kl",
)


@torch.no_grad()
def loss_metrics(
    valid: torch.Tensor,
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    pg: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    cfg: LossConfig,
) -> Dict[str, torch.Tensor]:
    """Token means over valid tokens (SPEC §5); fp32 scalars, 0 with no valid token, no host sync.

    fp64 inputs (the ground truth of the accuracy tests) keep fp64 metrics.
    """
    dtype = torch.float64 if ratio.dtype == torch.float64 else torch.float32
    v = valid.reshape(-1)
    count = v.sum()
    denom = count.clamp_min(1).to(dtype)

    def mean(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1).to(dtype)
        return torch.where(v, x, torch.zeros_like(x)).sum() / denom

    def fraction(flag: torch.Tensor) -> torch.Tensor:
        return mean(flag.to(dtype))

    r = ratio.reshape(-1).to(dtype)
    a = advantages.reshape(-1)
    zero = torch.zeros((), dtype=dtype, device=r.device)
    inf = torch.full((), float("inf"), dtype=dtype, device=r.device)
    above = r > 1.0 + cfg.clip_eps_high
    below = r < 1.0 - cfg.clip_eps_low
    clipped = ((a > 0) & above) | ((a < 0) & below)
    dual = (a < 0) & (r > cfg.dual_clip) if cfg.has_dual_clip else torch.zeros_like(above)
    return {
        "pg_loss": mean(pg),
        "kl": mean(kl),
        "entropy": mean(entropy),
        "clipfrac": fraction(clipped),
        "clipfrac_lower": fraction(dual),
        "ratio_mean": mean(r),
        # the appended ±inf keeps the reduction defined when there are no tokens at all (N = 0)
        "ratio_min": torch.where(count > 0, torch.cat([torch.where(v, r, inf), inf.view(1)]).amin(), zero),
        "ratio_max": torch.where(count > 0, torch.cat([torch.where(v, r, -inf), -inf.view(1)]).amax(), zero),
        "ratio_above": fraction(above),
        "ratio_below": fraction(below),
        "approx_kl": mean((r - 1.0) - log_ratio.reshape(-1)),
    }


def ppo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    cfg: LossConfig,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """The eager backend: loss, per-token lp and H (detached, 0 where masked), metrics.

    Inputs are already validated and broadcast: logits ``[..., V]``; targets, valid,
    weights, advantages and the log-prob tensors ``[...]``; masked targets are valid ids.
    """
    lp, entropy, _ = selective_logprobs_entropy(logits, targets, cfg.temperature)
    # A masked row's placeholder target may be a banned (−inf) token: zero lp and H there
    # so nothing downstream (exp(ref − lp) in k3) turns it into a NaN gradient.
    zeros = torch.zeros_like(lp)
    lp, entropy = torch.where(valid, lp, zeros), torch.where(valid, entropy, zeros)
    parts = per_token_loss(lp, entropy, advantages, old_logprobs, ref_logprobs, cfg)
    token_loss = torch.where(valid, parts["loss"], torch.zeros_like(parts["loss"]))
    loss = (weights.to(token_loss.dtype) * token_loss).sum()
    if loss.dtype != torch.float64:  # fp64 stays fp64, for gradcheck
        loss = loss.to(torch.float32)
    metrics = loss_metrics(
        valid, advantages, parts["ratio"].detach(), parts["log_ratio"].detach(),
        parts["pg"].detach(), parts["kl"].detach(), entropy.detach(), cfg,
    )
    lp_out, entropy_out = lp.detach(), entropy.detach()
    if lp_out.dtype != torch.float64:
        lp_out, entropy_out = lp_out.to(torch.float32), entropy_out.to(torch.float32)
    return loss, lp_out, entropy_out, metrics
