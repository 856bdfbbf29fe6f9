"""Vocabulary-parallel loss: each rank holds a contiguous shard ``[..., V_rank]`` of the logits.

Any row backend serves, unchanged: its statistics over the shard (lp_k, H_k, the shard's max
m_k and log-sum log s_k) are exactly the partial statistics a softmax needs. They are combined
here, once, for every backend, with two collectives per call (M = max_k m_k, shift_k = m_k − M):

* s = Σ_k exp(shift_k + log s_k)                                          (MAX, then SUM)
* Σ_j p_j·(x_j − M) = Σ_k exp(shift_k + log s_k)·((log s_k − H_k) + shift_k) / s,  H = log s − that
* x_y − M = (lp_k + log s_k) + shift_k on the rank that owns the target, lp = (x_y − M) − log s
* the probability on the shards that do not own the target, Σ_{k not owner} exp(shift_k + log s_k) / s:
  the owner's backward adds it to its own Σ_{j≠y} p_j for the one-hot factor 1 − p_y of a confident
  target (1 − p_y itself would cancel)

The per-token math (ratio, clip, KL, g) then runs on the combined values, identically on
every rank, and the backward stays local: each rank writes the gradient of its shard with
the global (M, log s) and H (a target owned by another rank is −1: no one-hot term there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends.rows import RowOps, RowParams, RowStats
from .token_loss import token_math


def combine_row_stats(
    stats: RowStats,  # this shard's lp_k (meaningful where owned), H_k, m_k, log s_k, [N] each
    owned: torch.Tensor,  # [N] bool: the target is in this shard
    group,
) -> RowStats:
    """Global (lp, H, m, log s) per row from every shard's statistics."""
    # A shard of banned tokens only (s_k = 0) takes no part in the maximum.
    shard_max = torch.where(torch.isneginf(stats.log_sum), torch.full_like(stats.row_max, float("-inf")),
                            stats.row_max)
    row_max = shard_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    # A row whose logits are all −inf everywhere has no finite max: keep it out of exp().
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    shift = shard_max - row_max
    scaled = torch.exp(shift + stats.log_sum)  # Σ_shard exp(x − M); 0 for a shard of banned tokens only
    mean_z = torch.where(scaled > 0, (stats.log_sum - stats.entropy) + shift, torch.zeros_like(scaled))
    target_z = torch.where(owned, (stats.logprobs + stats.log_sum) + shift, torch.zeros_like(scaled))
    not_owner = torch.where(owned, torch.zeros_like(scaled), scaled)
    packed = torch.stack([scaled, scaled * mean_z, target_z, not_owner])
    dist.all_reduce(packed, group=group)
    total, weighted_z, x_target, elsewhere = packed.unbind(0)
    log_sum = torch.log(total)
    return RowStats(x_target - log_sum, log_sum - weighted_z / total, row_max, log_sum, elsewhere / total)


def sharded_ops(ops: RowOps, group) -> RowOps:
    """A row backend over one vocabulary shard; targets are shard-local ids, −1 elsewhere."""

    def shard_stats(logits, targets, temperature) -> RowStats:
        owned = targets >= 0
        local = torch.where(owned, targets, torch.zeros_like(targets))
        return combine_row_stats(ops.logprobs(logits, local, temperature, True), owned, group)

    def forward(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams):
        return token_math(shard_stats(logits, targets, params.temperature), advantages, old_logprobs,
                          ref_logprobs, params)

    def logprobs(logits, targets, temperature, with_entropy) -> RowStats:
        stats = shard_stats(logits, targets, temperature)
        return stats if with_entropy else stats._replace(entropy=None)

    return RowOps(forward, ops.backward, logprobs)
