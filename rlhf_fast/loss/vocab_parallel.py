"""Vocabulary-parallel loss: each rank holds a contiguous shard ``[..., V_rank]`` of the logits.

Any row backend serves, unchanged: its forward over the shard gives the shard's lse_k, lp_k
and H_k, which are exactly the partial statistics a softmax needs. They are combined here,
once, for every backend, with two collectives per call:

* lse = log Σ_k exp(lse_k)                                   (MAX, then SUM)
* Σ_j p_j·x_j = Σ_k exp(lse_k − lse)·(lse_k − H_k), H = lse − Σ_j p_j·x_j
* x_y = lp_k + lse_k on the rank that owns the target, lp = x_y − lse

The per-token math (ratio, clip, KL, g) then runs on the combined values, identically on
every rank, and the backward stays local: each rank writes the gradient of its shard with
the global lse and H (a target owned by another rank is −1: no one-hot term there).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from ..backends.rows import RowOps, RowParams
from . import reference


def shard_range(vocab_local: int, device: torch.device, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's first vocabulary id and the total vocabulary (0-d int64 tensors).

    Shards may differ in size (V not divisible by the world size); ranks hold them in order.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = vocab_local
    dist.all_reduce(sizes, group=group)
    return sizes[:rank].sum(), sizes.sum()


def combine_row_stats(
    logprobs: torch.Tensor,  # [N] lp_k over this shard (meaningful where owned)
    entropy: torch.Tensor,  # [N] H_k of this shard's softmax
    lse: torch.Tensor,  # [N] lse_k of this shard
    owned: torch.Tensor,  # [N] bool: the target is in this shard
    group,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (lp, H, lse) per row from every shard's statistics."""
    row_max = lse.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    # A row whose logits are all −inf everywhere has no finite max: keep it out of exp().
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    scaled = torch.exp(lse - row_max)  # Σ_shard exp(x − max); 0 for a shard of banned tokens only
    shard_mean_x = torch.where(scaled > 0, lse - entropy, torch.zeros_like(lse))  # Σ_shard p_local·x
    target_logit = torch.where(owned, logprobs + lse, torch.zeros_like(lse))
    packed = torch.stack([scaled, scaled * shard_mean_x, target_logit])
    dist.all_reduce(packed, group=group)
    total, weighted_x, x_target = packed.unbind(0)
    global_lse = row_max + torch.log(total)
    return x_target - global_lse, global_lse - weighted_x / total, global_lse


def sharded_ops(ops: RowOps, group) -> RowOps:
    """A row backend over one vocabulary shard; targets are shard-local ids, −1 elsewhere."""

    def shard_stats(logits, targets, temperature):
        owned = targets >= 0
        local = torch.where(owned, targets, torch.zeros_like(targets))
        zeros = torch.zeros(local.shape, dtype=torch.float32, device=logits.device)
        res = ops.forward(logits, local, zeros, None, None, RowParams(temperature=temperature))
        return combine_row_stats(res.logprobs, res.entropy, res.lse, owned, group)

    def forward(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams):
        lp, entropy, lse = shard_stats(logits, targets, params.temperature)
        return reference.token_math(lp, entropy, lse, advantages, old_logprobs, ref_logprobs, params)

    def logprobs(logits, targets, temperature, with_entropy):
        lp, entropy, _ = shard_stats(logits, targets, temperature)
        return lp, (entropy if with_entropy else None)

    return RowOps(forward, ops.backward, logprobs)
