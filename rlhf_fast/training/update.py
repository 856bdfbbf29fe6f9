"""Step 6 of a PPO step: epochs × minibatches of the PPO loss and the clipped value loss."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .. import loss as rf_loss
from . import distributed
from .advantages import masked_mean
from .metrics import UpdateStats
from .models import critic_values, fused_head, logits, response_hidden
from .records import Rollout


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip: Optional[float], num_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """½·mean over valid tokens of max((V − G)², (V_clip − G)²), V_clip = V_old + clamp(V − V_old, ±clip).

    Returns ``(loss, clipfrac)``; ``clip=None`` is the plain squared error. ``num_tokens``:
    divide the sums by this (a data-parallel rank's share of the global minibatch's mean).
    """

    def mean(x):
        return masked_mean(x, mask) if num_tokens is None else (x * mask.to(x.dtype)).sum() / num_tokens

    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * mean(unclipped), torch.zeros(())
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * mean(torch.maximum(unclipped, clipped))
    return loss, mean((clipped > unclipped).float()).detach()


def ppo_update(cfg, dp, optimizer: torch.optim.Optimizer, rollout: Rollout, beta: float,
               generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Epochs × minibatches of the PPO loss (+ clipped value loss) on one rollout.

    Stops early when a minibatch's approx_kl exceeds 1.5 × ``early_stop_approx_kl``.
    Returns the update's metrics (loss metrics averaged over minibatches). ``generator``
    draws the minibatch order (default: torch's global RNG).

    ``dp`` (:class:`~.distributed.DataParallel` or its one-process stand-in) runs each
    minibatch: under data parallelism each global minibatch of ``minibatch_size`` replies is
    split into contiguous per-rank parts, each normalised by the global minibatch, so the
    summed gradient and the combined metrics equal one process's on the same minibatch.
    """
    stats = UpdateStats()
    n_replies = rollout.samples.response_ids.shape[0]
    device = rollout.samples.response_ids.device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    updates, early_stopped = 0, False
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n_replies, generator=generator).to(device)
        for start in range(0, n_replies, cfg.minibatch_size):
            rows = order[start : start + cfg.minibatch_size]
            loss, out, extra = dp.minibatch_loss(minibatch_loss, rollout, rows, beta, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            extra["grad_norm"] = dp.grad_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            updates += 1
            metrics, extra = dp.minibatch_metrics(out.metrics, extra, rollout, rows)
            stats.add(metrics, extra)
            target = cfg.early_stop_approx_kl
            if target is not None and float(metrics["approx_kl"]) > 1.5 * target:
                early_stopped = True
                break
        if early_stopped:
            break
    summary = stats.summary()
    summary.setdefault("value_loss", 0.0)
    summary.setdefault("value_clipfrac", 0.0)
    summary["epochs_run"] = updates / (n_replies // cfg.minibatch_size)
    summary["early_stopped"] = float(early_stopped)
    return summary


def minibatch_loss(
    policy: nn.Module, critic: Optional[nn.Module], rollout: Rollout, rows: torch.Tensor, beta: float,
    cfg, global_rows: Optional[torch.Tensor] = None,
):
    """Loss of minibatch ``rows``: ``(loss, PPOLossOutput, extra)``; extra holds the value-loss floats.

    ``global_rows`` (data parallel): ``rows`` are this rank's part of that minibatch, and the
    loss is its share of the minibatch's loss (see :mod:`.distributed`); the value loss and
    clipfrac in ``extra`` are then shares too (0-d tensors, summed over ranks).
    """
    hidden = response_hidden(policy, rollout.samples, rows)
    num_tokens = scale = None
    mask = rollout.samples.response_mask
    if global_rows is not None:
        num_tokens = mask[global_rows].sum().clamp_min(1)
        scale = distributed.global_loss_scale(cfg.loss_agg, mask, rows, global_rows)
    out = policy_loss(policy, hidden, rollout, rows, beta, cfg,
                      global_num_tokens=num_tokens if cfg.loss_agg == "token-mean" else None)
    if scale is not None:
        out = out._replace(loss=out.loss * scale)
    loss, extra = out.loss, {}
    if critic is not None:
        value_loss, value_clipfrac = clipped_value_loss(
            critic_values(critic, hidden, rollout.samples, rows), rollout.values[rows], rollout.returns[rows],
            mask[rows], cfg.value_clip, num_tokens,
        )
        loss = loss + cfg.vf_coef * value_loss
        if global_rows is None:
            extra.update(value_loss=float(value_loss.detach()), value_clipfrac=float(value_clipfrac))
        else:
            extra.update(value_loss=value_loss.detach(), value_clipfrac=value_clipfrac)
    return loss, out, extra


def policy_loss(policy: nn.Module, hidden: torch.Tensor, rollout: Rollout, rows, beta: float, cfg,
                global_num_tokens: Optional[torch.Tensor] = None) -> rf_loss.PPOLossOutput:
    """``rf.ppo_loss`` (or its fused-linear twin) on minibatch ``rows`` of the rollout, options from cfg.

    ``global_num_tokens``: the token-mean denominator when ``rows`` are one rank's part of a minibatch.
    The reference log-probs are always passed: the KL metric is free even when β is in the reward.
    """
    targets, mask = rollout.samples.response_ids[rows], rollout.samples.response_mask[rows]
    args = (targets, rollout.advantages[rows], rollout.old_logprobs[rows], rollout.ref_logprobs[rows], mask)
    call = dict(options=cfg.loss_for_step(beta), backend=cfg.loss_backend)
    if cfg.rollout_is != "none":  # the sampler's own log-probs (see sample_replies)
        call["rollout_logprobs"] = rollout.samples.sampling_logprobs[rows]
    if global_num_tokens is not None:
        call["global_num_tokens"] = global_num_tokens
    if cfg.use_fused_linear:
        head = fused_head(policy)
        return rf_loss.fused_linear_ppo_loss(hidden, head.pop("weight"), *args, **head, **call)
    return rf_loss.ppo_loss(logits(policy, hidden), *args, **call)
