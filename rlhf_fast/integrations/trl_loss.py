"""The loss of one TRL micro-batch and TRL's metrics about it (used by :mod:`rlhf_fast.integrations.trl`).

:func:`compute_loss` is what a trainer's ``_compute_loss`` becomes (:func:`trl_shim.install`): the
backbone's hidden states, the fused-linear loss with the options and the ``loss_type`` record that
``equip`` stored (:class:`Setup`), the record's normaliser around it, then TRL's metrics on the
loss's per-token log-probs and entropies (the record's metric family). TRL's internals are read
through :mod:`~rlhf_fast.integrations.trl_shim` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import torch

from ..loss import fused_linear_logprobs, fused_linear_ppo_loss, logprobs_ppo_loss
from ..loss.options import LossOptions
from ..training.metrics import pearson
from . import trl_shim as shim
from .transformers import LMHead, hidden_states, unwrap

__all__ = ["Setup", "cispo_metrics", "clip_ratio_metrics", "compute_loss"]


class Setup(NamedTuple):
    """What ``equip`` decides once per trainer (stored on it as ``_rlhf_fast``)."""

    options: LossOptions  # entropy_coef 0; the step's coefficient is substituted per call
    loss_type: Any  # the LossType record of the trainer's loss_type (rlhf_fast.integrations.trl.LOSS_TYPES)
    logit_scale: Optional[float]  # the model's logit transform (the head's weight is read at each call)
    logit_softcap: Optional[float]
    backend: str
    chunk_size: Optional[int]


class _Parts(NamedTuple):
    loss: torch.Tensor  # what TRL's _compute_loss returns (differentiable)
    policy_loss: torch.Tensor  # TRL's policy_loss metric (before gradient accumulation scaling), detached
    logprobs: torch.Tensor  # [B, T] detached, 0 where masked
    entropy: torch.Tensor  # [B, T] detached


def compute_loss(trainer, model, batch: shim.MicroBatch) -> torch.Tensor:
    mode = shim.mode(trainer)
    accumulation = shim.accumulation_steps(trainer, mode)
    coef = shim.entropy_coef(trainer)
    wrapped_model = trainer.accelerator.unwrap_model(model)
    parts = _inside_forward(model, wrapped_model, lambda: _loss_parts(trainer, wrapped_model, batch, coef,
                                                                        accumulation, mode))
    _log_metrics(trainer, mode, batch, parts)
    return parts.loss


def _inside_forward(wrapper, inner, fn: Callable):
    """``fn()`` run as ``inner``'s forward called through ``wrapper`` (DDP, FSDP, DeepSpeed hooks fire)."""
    if wrapper is inner:
        return fn()
    had_own = "forward" in vars(inner)
    previous = vars(inner).get("forward")

    def restore():
        if had_own:
            inner.forward = previous
        elif "forward" in vars(inner):
            del inner.forward

    def forward(*_args, **_kwargs):
        restore()
        return fn()

    inner.forward = forward
    try:
        return wrapper()
    finally:
        restore()


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def _full(t):
    """An FSDP2 DTensor parameter as a full (differentiable) tensor; anything else unchanged."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _loss_parts(trainer, model, batch: shim.MicroBatch, coef: float, accumulation: float, mode: str) -> _Parts:
    setup: Setup = trainer._rlhf_fast
    record, options, args = setup.loss_type, setup.options, trainer.args
    completion_ids, mask = batch.completion_ids, batch.mask
    input_ids = torch.cat([batch.prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    valid = mask.bool()
    n_completion = completion_ids.size(1)
    with trainer.accelerator.autocast():
        hidden = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, **batch.model_inputs)
    hidden = hidden[:, -n_completion - 1:-1]  # position t predicts token t + 1
    module = unwrap(model).get_output_embeddings()
    device = hidden.device
    if args.cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = hidden.dtype
    if shim.rollout_correction(trainer) != (options.rollout_is != "none"):
        raise RuntimeError("the trainer's use_vllm / vllm_importance_sampling_correction changed after equip(); "
                           "call rlhf_fast.integrations.trl.equip(trainer) again")
    one_pass = coef == 0.0 or record.bonus_in_loss  # the bonus has the policy term's token weights (or is off)
    if record.bonus_in_loss:
        options = dataclasses.replace(options, entropy_coef=coef)
    advantages, old = batch.advantages, batch.old_logprobs
    ref = batch.ref_logprobs if args.beta != 0.0 else None
    rollout = batch.sampling_logprobs if options.rollout_is != "none" else None
    if rollout is not None:  # TRL: a token vLLM could not score (NaN) gets weight 1, i.e. its old log-prob
        rollout = torch.where(torch.isnan(rollout), old, rollout)
    global_tokens, factor = None, None
    if record.global_tokens:
        normaliser = batch.num_items_in_batch.clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":  # num_items_in_batch counts the generation batch: one accumulation window's share
            normaliser = normaliser * accumulation / args.steps_per_generation
        global_tokens = normaliser.to(torch.float32)
        factor = global_tokens.clamp(min=1.0) / global_tokens  # rlhf_fast divides by max(normaliser, 1)
    elif record.all_sequences:  # TRL: mean over all B sequences; rlhf_fast: over those with a token
        factor = valid.any(-1).sum().clamp(min=1).to(torch.float32) / valid.shape[0]
    # The fused backward recomputes the logits from the weight when the options are not the plain PPO
    # loss: under ZeRO-3 that weight must outlive the gather, so a gathered copy is used then.
    copy_weight = _zero3() and not (one_pass and options.is_plain_ppo)
    with shim.gather_lm_head(module.weight, module.bias), torch.autocast(device.type, enabled=False):
        weight, bias = _full(module.weight), _full(module.bias)
        if copy_weight:
            weight, bias = weight.clone(), None if bias is None else bias.clone()
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        head = LMHead(weight, bias, setup.logit_scale, setup.logit_softcap)
        hidden = hidden.to(dtype)
        common = dict(chunk_size=setup.chunk_size, backend=setup.backend, **head.loss_kwargs())
        if one_pass:
            out = fused_linear_ppo_loss(hidden, weight, completion_ids, advantages, old, ref, valid, options=options,
                                        rollout_logprobs=rollout, global_num_tokens=global_tokens, **common)
            lp, entropy, bonus = out.logprobs, out.entropy, None
        else:
            lp, entropy = fused_linear_logprobs(hidden, weight, completion_ids, valid, with_entropy=True,
                                                temperature=options.temperature, **common)
            out = logprobs_ppo_loss(lp, entropy, completion_ids, advantages, old, ref, valid,
                                    vocab_size=weight.shape[0], options=options, rollout_logprobs=rollout,
                                    global_num_tokens=global_tokens)
            bonus = (entropy * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
            lp, entropy = lp.detach(), entropy.detach()
    policy = out.loss if factor is None else out.loss * factor
    scale = 1.0 if record.global_tokens else accumulation
    loss = policy / scale
    policy_loss = policy.detach()
    if bonus is not None:
        loss = loss - coef * bonus
    elif record.bonus_in_loss and coef != 0.0:  # the loss holds −η·H̄: TRL's policy_loss metric is without it
        policy_loss = policy_loss + coef * (entropy * mask).sum() / mask.sum().clamp(min=1.0)
    return _Parts(loss, policy_loss, lp, entropy)


# ----------------------------------------------------------------------------------
# TRL's metrics, from the per-token log-probs and entropies
# ----------------------------------------------------------------------------------


class Means(NamedTuple):
    """TRL's two reductions of a ``[B, T]`` (or, at the sequence level, ``[B, 1]``) metric over the loss mask."""

    accelerator: Any
    mask: torch.Tensor  # [B, T]

    def per_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]``: each completion's masked mean, gathered from every process."""
        mask = self.mask
        return self.accelerator.gather(x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1))

    def overall(self, x: torch.Tensor) -> float:
        """The masked mean over every process's tokens (over sequences for a ``[B, 1]`` metric)."""
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * self.mask).sum(), self.mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()


def clip_ratio_metrics(metrics, ratio: torch.Tensor, advantages: torch.Tensor, args, means: Means) -> None:
    """``clip_ratio/*``: TRL's clipped surrogate's low, high and region clip fractions."""
    if args.delta is not None:
        ratio = torch.clamp(ratio, max=args.delta)
    low = ((ratio < 1 - args.epsilon) & (advantages < 0)).float()
    high = ((ratio > 1 + shim.epsilon_high(args)) & (advantages > 0)).float()
    metrics["clip_ratio/low_mean"].append(means.overall(low))
    metrics["clip_ratio/high_mean"].append(means.overall(high))
    metrics["clip_ratio/region_mean"].append(means.overall(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(shim.nanmin(means.per_sequence(low)).item())
    metrics["clip_ratio/high_max"].append(shim.nanmax(means.per_sequence(high)).item())


def cispo_metrics(metrics, ratio: torch.Tensor, advantages: torch.Tensor, args, means: Means) -> None:
    """``cispo_clip_ratio``: the fraction of tokens whose importance weight CISPO caps."""
    metrics["cispo_clip_ratio"].append(means.overall(((ratio > shim.epsilon_high(args)) & (advantages > 0)).float()))


def _log_metrics(trainer, mode: str, batch: shim.MicroBatch, parts: _Parts) -> None:
    args = trainer.args
    metrics = shim.metrics(trainer, mode)
    mask = batch.mask
    lp, entropy = parts.logprobs, parts.entropy
    advantages = batch.advantages
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = lp if batch.old_logprobs is None else batch.old_logprobs
    log_ratio = lp - old
    if args.importance_sampling_level == "sequence":
        ratio = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        ratio = torch.exp(log_ratio)
    means = Means(trainer.accelerator, mask)
    if shim.entropy_bonus_enabled(trainer):
        metrics["policy_loss"].append(trainer.accelerator.gather(parts.policy_loss).nanmean().item())
        shim.update_entropy_controller(trainer, mode, entropy, mask)
    if args.beta != 0.0:
        ref = batch.ref_logprobs
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if args.use_bias_correction_kl:
            kl = kl * ratio
        metrics["kl"].append(means.overall(kl))
    metrics["entropy"].append(means.overall(entropy))
    family = trainer._rlhf_fast.loss_type.metrics
    if family is not None:
        family(metrics, ratio, advantages, args, means)
    if mode == "train":
        _monitor_inputs(trainer, batch, advantages, lp)


def _monitor_inputs(trainer, batch: shim.MicroBatch, advantages: torch.Tensor, lp: torch.Tensor) -> None:
    """What the reward-hacking monitor reads beyond TRL's metrics: the within-batch correlation of
    advantage and completion length (logged as ``rlhf_fast/advantage_length_corr``) and, for a
    :class:`~rlhf_fast.integrations.trl_monitor.RewardHackingCallback`, each completion token's KL to
    the reference (k1, when ``beta != 0``)."""
    mask = batch.mask
    lengths = mask.sum(-1).float()
    per_completion = advantages[:, 0] if advantages.shape[1] == 1 else (advantages * mask).sum(-1) / lengths.clamp(
        min=1.0)
    gather = trainer.accelerator.gather
    shim.metrics(trainer, "train")["rlhf_fast/advantage_length_corr"].append(pearson(gather(per_completion.float()),
                                                                                  gather(lengths)))
    callbacks = [cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "add_token_kl")]
    if callbacks and batch.ref_logprobs is not None:
        kl = (lp - batch.ref_logprobs).detach()
        for callback in callbacks:
            callback.add_token_kl(batch.completion_ids, kl, mask.bool())
