"""TRL's ``GRPOTrainer`` with the loss computed by rlhf_fast from the last hidden states and the LM head.

Two ways in (docs/integrations.md)::

    from rlhf_fast.integrations.trl import RLHFFastGRPOTrainer, equip
    trainer = RLHFFastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)   # a drop-in
    trainer = equip(GRPOTrainer(...))                                                    # or equip one

Everything but the loss is TRL's: generation, rewards, advantages, old / reference / vLLM
log-probs, logging, checkpoints. The loss of each micro-batch is ``rf.fused_linear_ppo_loss``
on the backbone's hidden states and the LM head (with the model's logit scale or soft-cap,
:mod:`rlhf_fast.integrations.transformers`), never the ``[B, T, V]`` logits, with the options
:func:`loss_options` maps from the ``GRPOConfig`` and TRL's normalisation of each ``loss_type``
(gradient accumulation and ``num_items_in_batch`` included). TRL's metric names are logged
(``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``policy_loss``, ``entropy_coef``), plus
``rlhf_fast/advantage_length_corr`` (the within-batch correlation of advantage and completion length)
for the reward-hacking monitor, whose callback (:mod:`rlhf_fast.integrations.trl_monitor`) also
receives each completion token's KL to the reference.

The entropy bonus (``entropy_coef``, ``use_adaptive_entropy``) is a token mean in TRL whatever
the ``loss_type``, while the policy term is weighted per ``loss_type``: where the two weightings
coincide (``bnpo``) the bonus is the loss's ``entropy_coef``; otherwise the loss is the same
per-token math on the differentiable fused log-probs and entropies of ``rf.fused_linear_logprobs``,
with the bonus added as TRL adds it. Options with no rlhf_fast equivalent raise at construction
(:func:`unsupported`).
"""

from __future__ import annotations

import dataclasses
import types
from contextlib import nullcontext
from typing import Callable, List, NamedTuple, Optional

import torch
from trl import GRPOTrainer

from ..loss import fused_linear_logprobs, fused_linear_ppo_loss, inputs, reference
from ..loss.options import LossOptions
from ..training.metrics import pearson
from .transformers import LMHead, UnsupportedModelError, hidden_states, lm_head, unwrap

__all__ = ["RLHFFastGRPOTrainer", "equip", "loss_options", "unsupported"]

_PPO_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_KNOWN_LOSS_TYPES = _PPO_FAMILY + ("cispo", "sapo")
_GLOBAL_TOKEN_NORMALISED = ("dapo", "cispo")  # divided by num_items_in_batch, not by gradient accumulation
_PER_SEQUENCE_MEAN = ("grpo", "sapo", "luspo")  # TRL averages over all B sequences, fully masked ones included
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                     "token_type_ids", "mm_token_type_ids", "image_position_ids")
_SEQUENCE_WEIGHT_CAP = 4.8e8
"""rlhf_fast's sequence-level rollout weight is exp(clamp(Σ log-ratio, −20, 20)) (docs/contract.md); TRL's has no
clamp. With an upper bound below e^20 ≈ 4.85e8 the two agree exactly: a weight above the bound is truncated to it
or masked either way. 4.8e8 is e^20 less 1%, so that fp32's rounding of e^20 (relative 6e-8) cannot put the bound
on the wrong side of our capped weight. Under e^−20 both weights are below 2.1e-9 (docs/integrations.md)."""
_AGGREGATION = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                "dapo": "token-mean", "cispo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                "luspo": "seq-mean-token-sum"}


def _rollout_correction(trainer) -> bool:
    args = trainer.args
    return bool(getattr(trainer, "use_vllm", False) and args.vllm_importance_sampling_correction)


def unsupported(trainer) -> List[str]:
    """What this trainer's configuration asks for that rlhf_fast cannot compute exactly (empty: all of it)."""
    args = trainer.args
    loss_type, level = args.loss_type, args.importance_sampling_level
    problems = []
    if loss_type == "vespo":
        problems.append("loss_type='vespo' (gamma-weighted sequence ratio) has no rlhf_fast policy loss")
    elif loss_type not in _KNOWN_LOSS_TYPES:
        problems.append(f"loss_type={loss_type!r} is not one rlhf_fast maps ({', '.join(_KNOWN_LOSS_TYPES)})")
    if level not in ("token", "sequence"):
        problems.append(f"importance_sampling_level={level!r} (token or sequence)")
    if level == "sequence" and loss_type in ("cispo", "sapo"):
        problems.append(f"loss_type={loss_type!r} with importance_sampling_level='sequence' (rlhf_fast's "
                        f"{loss_type} uses the token ratio; use importance_sampling_level='token')")
    if level == "sequence" and args.beta != 0.0 and args.use_bias_correction_kl:
        problems.append("use_bias_correction_kl with importance_sampling_level='sequence' and beta != 0 (TRL weights "
                        "the KL by the sequence ratio, rlhf_fast's kl_ratio_weighted by the token ratio); set "
                        "use_bias_correction_kl=False or importance_sampling_level='token'")
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and loss_type in _PPO_FAMILY and not args.delta > 1.0:
        problems.append(f"delta={args.delta} must be > 1 (two-sided clipping caps the ratio at delta)")
    if loss_type == "cispo" and not eps_high > 1.0:
        problems.append(f"loss_type='cispo' needs epsilon_high > 1 (TRL caps the ratio at epsilon_high itself; "
                        f"got {eps_high}, the ScaleRL value is 5.0)")
    if args.top_entropy_quantile < 1.0:
        problems.append(f"top_entropy_quantile={args.top_entropy_quantile} (masking the policy term by an entropy "
                        "quantile); use 1.0")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold (off-policy sequence masking); use None")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("the MoE router auxiliary loss (router_aux_loss_coef != 0 on a Mixture-of-Experts model); "
                        "set router_aux_loss_coef=0")
    if _rollout_correction(trainer) and loss_type != "vespo":
        mode = args.vllm_importance_sampling_mode
        if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
            problems.append(f"vllm_importance_sampling_mode={mode!r}")
        elif mode.startswith("token") and level == "sequence":
            problems.append(f"vllm_importance_sampling_mode={mode!r} with importance_sampling_level='sequence' "
                            "(TRL's gradient sees each completion's mean token weight, rlhf_fast's each token's "
                            "own); use a sequence_* mode")
        elif (args.vllm_importance_sampling_clip_min is None and args.vllm_importance_sampling_clip_max is None):
            problems.append(f"vllm_importance_sampling_mode={mode!r} without vllm_importance_sampling_clip_min or "
                            "_clip_max (rlhf_fast's rollout correction needs a bound)")
        elif mode.startswith("sequence") and not (args.vllm_importance_sampling_clip_max is not None and
                                                  args.vllm_importance_sampling_clip_max < _SEQUENCE_WEIGHT_CAP):
            problems.append(
                f"vllm_importance_sampling_mode={mode!r} with vllm_importance_sampling_clip_max="
                f"{args.vllm_importance_sampling_clip_max} (TRL weights a sequence by exp(Σ log-ratio) with no bound; "
                "rlhf_fast caps Σ at 20, so the two differ for a weight above e^20 ≈ 4.85e8); set "
                f"vllm_importance_sampling_clip_max below {_SEQUENCE_WEIGHT_CAP:.2g} (TRL's default is 3.0)")
    return problems


def loss_options(trainer, entropy_coef: float = 0.0) -> LossOptions:
    """The rlhf_fast loss options of a ``GRPOTrainer``'s configuration (per-token math; see the module doc)."""
    args = trainer.args
    loss_type = args.loss_type
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    fields = dict(
        kl_coef=float(args.beta), kl_estimator="k3", kl_ratio_weighted=bool(args.beta != 0.0 and
                                                                          args.use_bias_correction_kl),
        entropy_coef=float(entropy_coef), temperature=float(args.temperature), loss_agg=_AGGREGATION[loss_type],
        rollout_is_max=None,
    )
    if loss_type == "dr_grpo":
        fields["norm_length"] = float(args.max_completion_length)
    if loss_type == "cispo":  # TRL: −sg(min(r, ε_high))·A·lp, i.e. no lower clip and ε_high as the cap itself
        fields.update(policy_loss="cispo", clip_eps=1.0, clip_eps_high=float(eps_high) - 1.0)
    elif loss_type == "sapo":
        fields.update(policy_loss="sapo", sapo_tau_pos=float(args.sapo_temperature_pos),
                      sapo_tau_neg=float(args.sapo_temperature_neg))
    else:
        # TRL's two-sided clip −min(min(r, δ)·A, clamp(r, 1 − ε_low, 1 + ε_high)·A) is the clipped surrogate with
        # ε_high' = min(ε_high, δ − 1) and the dual clip c = max(δ, 1 + ε_high), for every δ > 1.
        high, dual = float(eps_high), None
        if args.delta is not None:
            high, dual = min(float(eps_high), float(args.delta) - 1.0), max(float(args.delta), 1.0 + float(eps_high))
        fields.update(policy_loss="gspo" if args.importance_sampling_level == "sequence" else "ppo",
                      clip_eps=float(eps_low), clip_eps_high=high, dual_clip=dual)
    if _rollout_correction(trainer):
        mode = args.vllm_importance_sampling_mode
        fields.update(rollout_is="truncate" if mode.endswith("truncate") else "mask",
                      rollout_is_level="sequence" if mode.startswith("sequence") else "token",
                      rollout_is_min=args.vllm_importance_sampling_clip_min,
                      rollout_is_max=args.vllm_importance_sampling_clip_max)
    return LossOptions(**fields)


class _Setup(NamedTuple):
    options: LossOptions  # entropy_coef 0; the step's coefficient is substituted per call
    logit_scale: Optional[float]  # the model's logit transform (the head's weight is read at each call)
    logit_softcap: Optional[float]
    backend: str
    chunk_size: Optional[int]


def equip(trainer: GRPOTrainer, *, backend: str = "auto", chunk_size: Optional[int] = None,
          verify_head="auto") -> GRPOTrainer:
    """Make ``trainer`` compute its loss with rlhf_fast (returns it); raises ``ValueError`` for what it cannot honour.

    ``backend`` is the row backend of the fused-linear loss (``"auto"``: Triton on CUDA, C++ on
    CPU); ``chunk_size`` the tokens per chunk (None: automatic). ``verify_head``: see
    :func:`rlhf_fast.integrations.transformers.lm_head` (one three-token forward of the model).
    """
    if not isinstance(trainer, GRPOTrainer):
        raise ValueError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    problems = unsupported(trainer)
    if problems:
        raise ValueError("rlhf_fast cannot reproduce TRL's loss for this GRPOConfig:\n  - " + "\n  - ".join(problems))
    try:
        head = lm_head(trainer.model, verify=verify_head, trust_head_forward=bool(trainer.args.cast_lm_head_to_fp32))
    except UnsupportedModelError as exc:
        raise ValueError(f"rlhf_fast cannot score this model: {exc}") from exc
    trainer._rlhf_fast = _Setup(loss_options(trainer), head.logit_scale, head.logit_softcap, backend, chunk_size)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


class RLHFFastGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is rlhf_fast's fused-linear loss (the same arguments, plus two).

    ``rlhf_fast_backend`` and ``rlhf_fast_chunk_size``: the row backend and tokens per chunk
    (see :func:`equip`). A configuration rlhf_fast cannot reproduce raises ``ValueError`` here.
    """

    def __init__(self, *args, rlhf_fast_backend: str = "auto", rlhf_fast_chunk_size: Optional[int] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        equip(self, backend=rlhf_fast_backend, chunk_size=rlhf_fast_chunk_size)


# ----------------------------------------------------------------------------------
# The loss of one micro-batch
# ----------------------------------------------------------------------------------


class _Parts(NamedTuple):
    loss: torch.Tensor  # what TRL's _compute_loss returns (differentiable)
    policy_loss: torch.Tensor  # TRL's policy_loss metric (before gradient accumulation scaling), detached
    logprobs: torch.Tensor  # [B, T] detached, 0 where masked
    entropy: torch.Tensor  # [B, T] detached


def _entropy_coef(trainer) -> float:
    """The entropy bonus coefficient TRL applies in this micro-batch (adaptive gating included)."""
    if not getattr(trainer, "_entropy_bonus_enabled", False):
        return 0.0
    if trainer.use_adaptive_entropy:
        return float(trainer.entropy_coef) if trainer._last_world_entropy <= trainer.args.entropy_target else 0.0
    return float(trainer.entropy_coef)


def _compute_loss(self: GRPOTrainer, model, batch):
    mode = "train" if self.model.training else "eval"
    accumulation = float(self.current_gradient_accumulation_steps) if mode == "train" else 1.0
    coef = _entropy_coef(self)
    wrapped_model = self.accelerator.unwrap_model(model)
    parts = _inside_forward(model, wrapped_model, lambda: _loss_parts(self, wrapped_model, batch, coef,
                                                                        accumulation, mode))
    _log_metrics(self, mode, batch, parts)
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


def _gather_ctx(*params):
    try:  # ZeRO-3: gather the partitioned LM head for the direct read, as TRL does for its fused head
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover - older TRL
        return nullcontext()
    return maybe_gather_lm_head_ctx(*params)


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def _full(t):
    """An FSDP2 DTensor parameter as a full (differentiable) tensor; anything else unchanged."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _loss_parts(self: GRPOTrainer, model, batch, coef: float, accumulation: float, mode: str) -> _Parts:
    setup: _Setup = self._rlhf_fast
    args = self.args
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in batch else completion_mask * batch["tool_mask"]
    valid = mask.bool()
    n_completion = completion_ids.size(1)
    extra = {key: batch[key] for key in _MODEL_INPUT_KEYS if batch.get(key) is not None}
    with self.accelerator.autocast():
        hidden = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, **extra)
    hidden = hidden[:, -n_completion - 1:-1]  # position t predicts token t + 1
    module = unwrap(model).get_output_embeddings()
    device = hidden.device
    if args.cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = hidden.dtype
    loss_type = args.loss_type
    options = setup.options
    if _rollout_correction(self) != (options.rollout_is != "none"):
        raise RuntimeError("the trainer's use_vllm / vllm_importance_sampling_correction changed after equip(); "
                           "call rlhf_fast.integrations.trl.equip(trainer) again")
    one_pass = coef == 0.0 or loss_type == "bnpo"  # the bonus has the policy term's token weights (or is off)
    if loss_type == "bnpo":
        options = dataclasses.replace(options, entropy_coef=coef)
    advantages = batch["advantages"]
    old = batch.get("old_per_token_logps")
    ref = batch.get("ref_per_token_logps") if args.beta != 0.0 else None
    rollout = batch.get("sampling_per_token_logps") if options.rollout_is != "none" else None
    if rollout is not None:  # TRL: a token vLLM could not score (NaN) gets weight 1, i.e. its old log-prob
        rollout = torch.where(torch.isnan(rollout), old, rollout)
    global_tokens, factor = None, None
    if loss_type in _GLOBAL_TOKEN_NORMALISED:
        normaliser = batch["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":  # num_items_in_batch counts the generation batch: one accumulation window's share
            normaliser = normaliser * accumulation / args.steps_per_generation
        global_tokens = normaliser.to(torch.float32)
        factor = global_tokens.clamp(min=1.0) / global_tokens  # rlhf_fast divides by max(normaliser, 1)
    elif loss_type in _PER_SEQUENCE_MEAN:  # TRL: mean over all B sequences; rlhf_fast: over those with a token
        factor = valid.any(-1).sum().clamp(min=1).to(torch.float32) / valid.shape[0]
    # The fused backward recomputes the logits from the weight when the options are not the plain PPO
    # loss: under ZeRO-3 that weight must outlive the gather, so a gathered copy is used then.
    copy_weight = _zero3() and not (one_pass and options.is_plain_ppo)
    with _gather_ctx(module.weight, module.bias), torch.autocast(device.type, enabled=False):
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
            x = inputs.prepare(lp.shape, weight.shape[0], device, hidden.dtype, completion_ids, advantages, old, ref,
                               valid, options, validate=True, rollout_logprobs=rollout,
                               global_num_tokens=global_tokens, other="hidden")
            out = reference.finish_token_loss(lp.reshape(-1), entropy.reshape(-1), x)
            bonus = (entropy * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
            lp, entropy = lp.detach(), entropy.detach()
    policy = out.loss if factor is None else out.loss * factor
    scale = 1.0 if loss_type in _GLOBAL_TOKEN_NORMALISED else accumulation
    loss = policy / scale
    policy_loss = policy.detach()
    if bonus is not None:
        loss = loss - coef * bonus
    elif loss_type == "bnpo" and coef != 0.0:  # the loss holds −η·H̄: TRL's policy_loss metric is without it
        policy_loss = policy_loss + coef * (entropy * mask).sum() / mask.sum().clamp(min=1.0)
    return _Parts(loss, policy_loss, lp, entropy)


# ----------------------------------------------------------------------------------
# TRL's metrics, from the per-token log-probs and entropies
# ----------------------------------------------------------------------------------


def _log_metrics(self: GRPOTrainer, mode: str, batch, parts: _Parts) -> None:
    from trl.trainer.utils import nanmax, nanmin

    args = self.args
    metrics = self._metrics[mode]
    completion_mask = batch["completion_mask"]
    mask = completion_mask if "tool_mask" not in batch else completion_mask * batch["tool_mask"]
    lp, entropy = parts.logprobs, parts.entropy
    advantages = batch["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = batch.get("old_per_token_logps")
    old = lp if old is None else old
    log_ratio = lp - old
    if args.importance_sampling_level == "sequence":
        coef_1 = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        coef_1 = torch.exp(log_ratio)

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if getattr(self, "_entropy_bonus_enabled", False):
        metrics["policy_loss"].append(self.accelerator.gather(parts.policy_loss).nanmean().item())
        _adaptive_entropy_update(self, mode, entropy, mask)
    if args.beta != 0.0:
        ref = batch["ref_per_token_logps"]
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if args.use_bias_correction_kl:
            kl = kl * coef_1
        metrics["kl"].append(global_masked_mean(kl))
    metrics["entropy"].append(global_masked_mean(entropy))
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.loss_type in _PPO_FAMILY:
        if args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=args.delta)
        low = ((coef_1 < 1 - eps_low) & (advantages < 0)).float()
        high = ((coef_1 > 1 + eps_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
    elif args.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_masked_mean(((coef_1 > eps_high) & (advantages > 0)).float()))
    if mode == "train":
        _monitor_inputs(self, batch, mask, advantages, lp)


def _monitor_inputs(self: GRPOTrainer, batch, mask: torch.Tensor, advantages: torch.Tensor, lp: torch.Tensor) -> None:
    """What the reward-hacking monitor reads beyond TRL's metrics: the within-batch correlation of
    advantage and completion length (logged as ``rlhf_fast/advantage_length_corr``) and, for a
    :class:`~rlhf_fast.integrations.trl_monitor.RewardHackingCallback`, each completion token's KL to
    the reference (k1, when ``beta != 0``)."""
    lengths = mask.sum(-1).float()
    per_completion = advantages[:, 0] if advantages.shape[1] == 1 else (advantages * mask).sum(-1) / lengths.clamp(
        min=1.0)
    gather = self.accelerator.gather
    self._metrics["train"]["rlhf_fast/advantage_length_corr"].append(pearson(gather(per_completion.float()),
                                                                              gather(lengths)))
    callbacks = [cb for cb in self.callback_handler.callbacks if hasattr(cb, "add_token_kl")]
    ref = batch.get("ref_per_token_logps")
    if callbacks and ref is not None:
        kl = (lp - ref).detach()
        for callback in callbacks:
            callback.add_token_kl(batch["completion_ids"], kl, mask.bool())


def _adaptive_entropy_update(self: GRPOTrainer, mode: str, entropy: torch.Tensor, mask: torch.Tensor) -> None:
    """TRL's adaptive entropy controller and its ``entropy_coef`` log (same state, same rule)."""
    if self.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropy * mask).sum(), mask.sum()]).detach()
        window = getattr(self, "_entropy_window_stats", None)
        self._entropy_window_stats = stats if window is None else window + stats
        if self.accelerator.sync_gradients:
            totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            delta = self.args.entropy_coef_delta
            if world_entropy <= self.args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + delta, self.args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - delta, self.args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None
    if mode == "train" and self.accelerator.sync_gradients:
        self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

