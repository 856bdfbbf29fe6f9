"""Data-parallel PPO on torch.distributed: DDP or FSDP2 for the trained models, and the few
collectives that make an N-rank step equal a one-process step over the same global batch.

How a step is split (:func:`rlhf_fast.train_ppo` under ``torchrun``):

* rollout — the step's global prompt list is chosen from (seed, step) as in one process; rank
  r samples, scores and computes log-probs/values for its contiguous slice, with the global
  RNG seeded from (seed, step, r). The per-reply tensors are then all-gathered (re-padded to
  the global prompt/reply widths), so every rank holds the *global* rollout: rewards,
  advantages (GAE whitening, GRPO/RLOO groups), diagnostics and the KL controller's input are
  computed from it exactly as in one process, with no per-statistic collective;
* update — one permutation of the global replies per epoch, from (seed, step) on every rank;
  each global minibatch is split into contiguous per-rank parts. The loss of a part is
  normalised by the *global* minibatch (``global_num_tokens`` for token-mean; the global
  number of sequences for the seq-* modes, see :func:`global_loss_scale`), so the sum over
  ranks is the one-process loss; DDP/FSDP2 average gradients, hence ``loss × world``;
* metrics — each part's token means are combined weighted by its token count
  (:func:`all_reduce_minibatch_metrics`).

Only the sampling depends on the world size: ``generate`` draws a whole batch's tokens from
one RNG stream, so the same prompts split over a different number of ranks get different
replies. Given the replies, everything else equals one process up to summation order, and a
checkpoint resumes under any world size (no RNG state is saved: it derives from seed, step
and rank). The data-parallel group is the default (world) group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .records import Rollout, Samples
from .reward import position_ids_from_mask

DATA_PARALLEL_MODES = ("auto", "none", "ddp", "fsdp2")


def resolve_data_parallel(mode: str) -> Optional[str]:
    """``"ddp"``, ``"fsdp2"`` or ``None`` (one process) for a ``PPOConfig.data_parallel`` value."""
    if mode == "none":
        return None
    if mode == "auto":
        return "ddp" if dist.is_available() and dist.is_initialized() else None
    return mode


def init_from_env() -> Optional[torch.device]:
    """Join the process group that ``torchrun`` describes (env ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``).

    NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, gloo and CPU otherwise. Returns
    the device for this rank's models, or ``None`` when not launched by torchrun.
    """
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...): the same parts give the same seed."""
    value = 0x2545F4914F6CDD1D
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


# ----------------------------------------------------------------------------- models


class PolicyAndCritic(nn.Module):
    """The trained models under one root, so DDP/FSDP2 see every use of their parameters.

    ``forward(fn, *args)`` runs ``fn(policy, critic, *args)`` inside the wrapper's forward:
    the update's minibatch loss (which reads the LM head's weight directly for the
    fused-linear loss) and, under FSDP2, the rollout's generation.
    """

    def __init__(self, policy: nn.Module, critic: Optional[nn.Module]):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.policy, self.critic, *args, **kwargs)


class SingleProcess:
    """The one-process stand-in for :class:`DataParallel`: the same interface, no collectives.

    The loop calls these methods whatever the world size, so it reads top to bottom
    without branches; here each is the identity (or the plain call).
    """

    kind: Optional[str] = None
    rank, world, is_main = 0, 1, True
    synced_generation = False

    def __init__(self, policy: nn.Module, critic: Optional[nn.Module]):
        self.models = PolicyAndCritic(policy, critic)

    def seed_step(self, seed: int, step: int) -> None:
        pass  # one process keeps its global RNG stream (restored exactly on resume)

    def local_prompts(self, prompts: List[List[int]]) -> List[List[int]]:
        return prompts

    def sample_and_score(self, fn: Callable, *args):
        return fn(self.models.policy, self.models.critic, *args, self.synced_generation)

    def gather_rollout(self, rollout: Rollout, pad_token_id: int) -> Rollout:
        return rollout

    def minibatch_order(self, seed: int, step: int) -> Optional[torch.Generator]:
        return None  # torch's global RNG

    def minibatch_loss(self, fn: Callable, rollout: Rollout, rows: torch.Tensor, *args):
        """``fn(policy, critic, rollout, rows, *args) -> (loss, PPOLossOutput, extra)``."""
        return fn(self.models.policy, self.models.critic, rollout, rows, *args)

    def minibatch_metrics(self, metrics: Dict[str, torch.Tensor], extra: Dict, rollout: Rollout,
                          rows: torch.Tensor):
        return metrics, extra

    def grad_norm(self, norm: torch.Tensor) -> float:
        return float(norm)

    def broadcast(self, obj):
        return obj


@dataclass
class DataParallel:
    """The data-parallel context of a run: its group, this rank, and the wrapped models.

    Same interface as :class:`SingleProcess`; each method is the step's collective work.
    """

    kind: str  # "ddp" | "fsdp2"
    group: dist.ProcessGroup
    rank: int  # rank in ``group``
    world: int
    models: PolicyAndCritic  # unwrapped root (state dicts); under FSDP2 the sharded root itself
    module: nn.Module  # what the update calls: DDP(models), or models under FSDP2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def synced_generation(self) -> bool:
        return self.kind == "fsdp2"  # sharded parameters: every rank runs forwards until all are done

    def seed_step(self, seed: int, step: int) -> None:
        torch.manual_seed(derived_seed(seed, step, self.rank))

    def local_prompts(self, prompts: List[List[int]]) -> List[List[int]]:
        return prompts[shard_slice(len(prompts), self.rank, self.world)]

    def sample_and_score(self, fn: Callable, *args):
        """``fn(policy, critic, *args)`` outside the update (rollout): FSDP2 must unshard through
        the root's forward; DDP needs no wrapper."""
        if self.kind == "fsdp2":
            return self.module(fn, *args, self.synced_generation)
        return fn(self.models.policy, self.models.critic, *args, self.synced_generation)

    def gather_rollout(self, local: Rollout, pad_token_id: int) -> Rollout:
        """Every rank's scored rollout in rank order, re-padded to the global prompt and reply widths.

        Prompts stay left-padded and replies right-padded (pad id, mask 0, zeros in the per-token
        tensors), as one process's ``generate`` over all prompts lays them out.
        """
        samples, group = local.samples, self.group
        device = samples.input_ids.device
        prompt_len, reply_len = max_over_ranks([samples.prompt_len, samples.response_ids.shape[1]], device, group)

        def rows(t, width=None, left=False, value=0):
            return all_gather_rows(t, group, width, left, value)

        def sequence(t, value):  # [b, P + R]: prompt part left-padded, reply part right-padded
            return torch.cat([rows(t[:, : samples.prompt_len], prompt_len, True, value),
                              rows(t[:, samples.prompt_len :], reply_len, False, value)], dim=1)

        attention_mask = sequence(samples.attention_mask, 0)
        gathered = Samples(
            sequence(samples.input_ids, pad_token_id), attention_mask, position_ids_from_mask(attention_mask),
            prompt_len, rows(samples.response_ids, reply_len, value=pad_token_id),
            rows(samples.response_mask, reply_len, value=False), rows(samples.lengths), rows(samples.has_eos),
            None if samples.sampling_logprobs is None else rows(samples.sampling_logprobs, reply_len),
        )
        return local._replace(
            samples=gathered, old_logprobs=rows(local.old_logprobs, reply_len),
            ref_logprobs=rows(local.ref_logprobs, reply_len), entropy=rows(local.entropy, reply_len),
            values=None if local.values is None else rows(local.values, reply_len),
            raw_scores=rows(local.raw_scores), norm_scores=rows(local.norm_scores),
        )

    def minibatch_order(self, seed: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(seed, step, -1))  # the same order on every rank

    def _part(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[shard_slice(len(rows), self.rank, self.world)]

    def minibatch_loss(self, fn: Callable, rollout: Rollout, rows: torch.Tensor, *args):
        """This rank's contiguous part of global minibatch ``rows``, normalised by the global minibatch."""
        loss, out, extra = self.module(fn, rollout, self._part(rows), *args, rows)
        return loss * self.world, out, extra  # DDP and FSDP2 average gradients; the parts are shares of one loss

    def minibatch_metrics(self, metrics: Dict[str, torch.Tensor], extra: Dict, rollout: Rollout,
                          rows: torch.Tensor):
        """The global minibatch's metrics, identical on every rank."""
        value_keys = [k for k in ("value_loss", "value_clipfrac") if k in extra]
        n_tokens = rollout.samples.response_mask[self._part(rows)].sum()
        combined = all_reduce_minibatch_metrics(metrics, {k: extra[k] for k in value_keys}, n_tokens, self.group)
        extra = {**extra, **{k: float(combined[k]) for k in value_keys}}
        return {k: combined[k] for k in metrics}, extra

    def grad_norm(self, norm) -> float:
        """``clip_grad_norm_``'s result as a float (a replicated DTensor under FSDP2)."""
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def broadcast(self, obj, src_rank: int = 0):
        """``obj`` of ``src_rank`` (rank in the group) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, group_src=src_rank, group=self.group)
        return box[0]


def _shard_blocks(model: nn.Module, mesh) -> None:
    """FSDP2 on each transformer block (``_no_split_modules`` of a transformers model)."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh)


def setup(policy: nn.Module, critic: Optional[nn.Module], mode: str):
    """The run's data-parallel context: :class:`DataParallel` under torch.distributed, else :class:`SingleProcess`."""
    kind = resolve_data_parallel(mode)
    return SingleProcess(policy, critic) if kind is None else wrap(policy, critic, kind)


def wrap(policy: nn.Module, critic: Optional[nn.Module], kind: str, group=None) -> DataParallel:
    """Wrap policy and critic (already on this rank's device) for data parallelism.

    ``"ddp"``: one DDP over both (parameters broadcast from rank 0; gradients averaged).
    ``"fsdp2"``: ``fully_shard`` on every transformer block, then on the root (parameters,
    gradients and optimizer state sharded; each rank must start from the same weights).
    Build the optimizer *after* this call (FSDP2 replaces the parameters by DTensors).
    The frozen reference and the reward model are not wrapped: each rank keeps a replica.
    """
    group = group if group is not None else dist.group.WORLD
    models = PolicyAndCritic(policy, critic)
    device = next(policy.parameters()).device
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(
            models, device_ids=None, process_group=group,  # inputs are already on the device
            forward_sync_buffers=False,  # buffers (causal masks, rotary tables) are constants
            static_graph=True,  # the same parameters every minibatch; also tolerates unused ones
        )
    elif kind == "fsdp2":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(group, device.type)
        for model in (policy, critic):
            if model is not None:
                _shard_blocks(model, mesh)
        fully_shard(models, mesh=mesh)
        module = models
    else:
        raise ValueError(f"data-parallel kind must be 'ddp' or 'fsdp2', got {kind!r}")
    return DataParallel(kind, group, dist.get_rank(group), dist.get_world_size(group), models, module)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full, unsharded state dict on CPU (every rank takes part; use it on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------- rollout


def shard_slice(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of ``n`` items (``n`` divisible by ``world``)."""
    per_rank = n // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def max_over_ranks(values: Sequence[int], device, group) -> list:
    """Element-wise maximum of small integers over the ranks (one collective)."""
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def all_gather_rows(t: torch.Tensor, group, width: Optional[int] = None, left: bool = False, value=0) -> torch.Tensor:
    """Every rank's rows of ``t`` ``[b, L, ...]`` (same b everywhere), concatenated in rank order.

    With ``width``, dim 1 is first padded to it with ``value``, on the left (``left=True``,
    for left-padded prompts) or on the right.
    """
    if width is not None and t.shape[1] < width:
        pad_shape = (t.shape[0], width - t.shape[1]) + tuple(t.shape[2:])
        pad = torch.full(pad_shape, value, dtype=t.dtype, device=t.device)
        t = torch.cat([pad, t] if left else [t, pad], dim=1)
    is_bool = t.dtype == torch.bool
    send = t.to(torch.uint8) if is_bool else t  # not every backend reduces bool
    parts = [torch.empty_like(send) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, send.contiguous(), group=group)
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out


# ----------------------------------------------------------------------------- update


def global_loss_scale(loss_agg: str, mask: torch.Tensor, rows: torch.Tensor, global_rows: torch.Tensor):
    """Factor that turns the loss of ``rows`` (normalised by its own sequences) into its share of
    the loss of ``global_rows`` (one process's minibatch); ``None`` for token-mean, which takes
    ``global_num_tokens`` instead.

    ``rf.ppo_loss`` is linear in each token's loss with weights w = m / normaliser (every aggregation mode), so
    rescaling by local / global normaliser is exact: B_valid for ``seq-mean-token-sum`` and
    ``seq-mean-token-mean`` (the per-sequence token means are local), B for
    ``seq-mean-token-sum-norm`` (T is the rollout width, the same on every rank).
    """
    if loss_agg == "token-mean":
        return None
    if loss_agg == "seq-mean-token-sum-norm":
        return rows.numel() / global_rows.numel()
    local = mask[rows].any(-1).sum().clamp_min(1).float()
    total = mask[global_rows].any(-1).sum().clamp_min(1).float()
    return local / total


def all_reduce_minibatch_metrics(
    token_means: Dict[str, torch.Tensor],  # token means over this rank's n_tokens (rf.ppo_loss metrics)
    sums: Dict[str, torch.Tensor],  # already-normalised shares, summed over ranks (value loss)
    n_tokens: torch.Tensor,  # valid tokens of this rank's part
    group,
) -> Dict[str, torch.Tensor]:
    """The metrics of the global minibatch, identical on every rank (two collectives).

    Token means are weighted by each rank's token count; ``ratio_min``/``ratio_max`` are
    reduced over the ranks that have tokens (0 when no rank has any, as in one process).
    """
    extremes = ("ratio_min", "ratio_max")
    names = [k for k in token_means if k not in extremes]
    device = n_tokens.device
    n = n_tokens.to(torch.float32)
    packed = torch.stack([token_means[k].float() * n for k in names] + [sums[k].float().to(device) for k in sums]
                         + [n])
    dist.all_reduce(packed, group=group)
    total = packed[-1]
    out = {k: packed[i] / total.clamp_min(1.0) for i, k in enumerate(names)}
    out.update({k: packed[len(names) + i] for i, k in enumerate(sums)})
    if all(k in token_means for k in extremes):
        neg_inf = torch.full((), float("-inf"), device=device)
        ends = torch.stack([torch.where(n > 0, token_means["ratio_max"].float(), neg_inf),
                            torch.where(n > 0, -token_means["ratio_min"].float(), neg_inf)])
        dist.all_reduce(ends, op=dist.ReduceOp.MAX, group=group)
        zero = torch.zeros((), device=device)
        out["ratio_max"] = torch.where(total > 0, ends[0], zero)
        out["ratio_min"] = torch.where(total > 0, -ends[1], zero)
    return out
