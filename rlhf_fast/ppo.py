"""A lean PPO loop for RLHF on any ``transformers`` causal LM, with the diagnostics that
expose reward hacking.

One step, top to bottom (:func:`train`):

1. rollout — pick ``batch`` prompts, sample ``samples_per_prompt`` replies each with
   ``generate`` (do_sample, temperature τ, no top-k/top-p, stop at EOS);
2. old and reference log-probs through :func:`rlhf_fast.logprobs` at the same τ (never a
   full-vocabulary log-softmax), values from the critic;
3. score — reward model at the end of each reply (raw, or normalised by its calibration),
   minus the missing-EOS and length penalties;
4. KL to the reference — per-token k1 weighted by β in the reward, or any estimator in
   the loss;
5. advantages — GAE with a critic (+ whitening), or critic-free GRPO / RLOO;
6. epochs × minibatches of :func:`rlhf_fast.ppo_loss` + clipped value loss, gradient
   clipping, optional early stop when approx-KL exceeds 1.5× a target;
7. KL controller update, diagnostics to ``metrics.jsonl`` and the progress bar,
   atomic checkpoint.

The KL target of the adaptive controller is the **per-sequence sum** of k1 to the
reference (mean over the step's replies); ``kl_ref_k1_sum`` in the metrics is that number.

Conventions: the policy runs in eval mode (dropout off) for rollout *and* update, so the
first minibatch's ratio is exactly 1. Logits are ``lm_head(last_hidden_state)`` of the
model's body (true for GPT-2, Llama, Mistral, Qwen; models that post-process logits,
e.g. with soft-capping, are not supported).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import distributed, functional
from .advantages import (
    ADVANTAGE_ESTIMATORS,
    explained_variance,
    gae_advantages,
    grpo_advantages,
    masked_mean,
    rloo_advantages,
    whiten,
)
from .checkpoint import (
    atomic_save,
    atomic_write_text,
    latest_sharded,
    load_sharded,
    rng_state,
    save_sharded,
    seed_everything,
    set_rng_state,
)
from .checkpoint import load as load_checkpoint
from .config import BACKENDS, KL_ESTIMATORS, LOSS_AGGREGATIONS
from .kl_control import AdaptiveKLController, FixedKLController
from .reward import position_ids_from_mask

KL_PLACEMENTS = ("reward", "loss")


@dataclass
class PPOConfig:
    """Every knob of :func:`train`; ``python -m rlhf_fast ppo --help`` lists them."""

    # --- run ---
    seed: int = 0
    """Seed of torch, python and numpy RNGs (sampling, minibatch order) and of prompt selection."""
    steps: int = 100
    """Number of PPO steps (rollout + update) in the whole run."""
    batch: int = 8
    """Prompts per step."""
    samples_per_prompt: int = 1
    """Replies sampled per prompt (≥ 2 for GRPO and RLOO); a step has batch × samples_per_prompt replies."""
    minibatch_size: int = 8
    """Replies per optimiser step; must divide batch × samples_per_prompt."""
    epochs: int = 1
    """Passes over the step's replies (PPO epochs)."""
    lr: float = 1e-5
    """AdamW learning rate of the policy."""
    value_lr: Optional[float] = None
    """Learning rate of the value head or critic (None = lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    # --- sampling ---
    max_new_tokens: int = 32
    """Length limit of a reply, in tokens (EOS included)."""
    temperature: float = 1.0
    """Sampling temperature τ; the same τ divides the logits in the log-probs and the loss."""
    # --- loss (SPEC.md) ---
    clip_eps: float = 0.2
    """ε_low of the clipped surrogate."""
    clip_eps_high: Optional[float] = None
    """ε_high for asymmetric "clip-higher" (None = clip_eps)."""
    dual_clip: Optional[float] = None
    """Dual-clip bound c > 1 for negative advantages (None = off)."""
    entropy_coef: float = 0.0
    """Weight η of the entropy bonus."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How per-token losses are aggregated (SPEC §3)."""
    loss_backend: Literal["auto", "triton", "cpp", "eager"] = "auto"
    """Backend of rf.ppo_loss / rf.logprobs."""
    use_fused_linear: bool = False
    """Use rf.fused_linear_ppo_loss / rf.fused_linear_logprobs on hidden states (never builds the logits)."""
    # --- KL to the reference ---
    kl_coef: float = 0.05
    """β: the initial (adaptive) or fixed KL coefficient."""
    kl_placement: Literal["reward", "loss"] = "reward"
    """"reward": −β·k1 per token in the reward; "loss": β·estimator in the PPO loss."""
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = "k3"
    """KL estimator used when kl_placement == "loss" (the reward placement always uses k1)."""
    adaptive_kl: bool = False
    """Adapt β toward kl_target (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target of the adaptive controller: KL to the reference per reply (sum over tokens, nats)."""
    kl_horizon: float = 10000.0
    """Horizon H of the adaptive controller, in replies: β ← β·(1 + e·n/H)."""
    # --- reward shaping ---
    reward_normalize: bool = False
    """Use the reward model's calibration: (score − mean) / std on reference samples."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a reply that hits max_new_tokens without EOS."""
    length_penalty: float = 0.0
    """Subtracted from the score once per reply token."""
    # --- advantages ---
    advantage_estimator: Literal["gae", "grpo", "rloo"] = "gae"
    """"gae" (needs a critic), "grpo" (group-normalised) or "rloo" (leave-one-out)."""
    gamma: float = 1.0
    """GAE discount γ."""
    lam: float = 0.95
    """GAE λ."""
    whiten: bool = True
    """Whiten advantages over the step (valid tokens for GAE, replies for GRPO/RLOO)."""
    group_std_normalize: bool = True
    """GRPO: divide by the group's std (False = centre only, as Dr. GRPO)."""
    # --- value function ---
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: Optional[float] = 0.2
    """Clip of the value update around the rollout values (None = unclipped)."""
    # --- optimisation ---
    max_grad_norm: Optional[float] = 1.0
    """Gradient-norm clip over policy and critic (None = off)."""
    early_stop_approx_kl: Optional[float] = None
    """Target approx-KL: stop the epoch loop when a minibatch's approx_kl > 1.5× this (None = off)."""
    # --- output ---
    out_dir: str = "runs/ppo"
    """Directory of metrics.jsonl and checkpoint.pt."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps and at the end (0 = never)."""
    resume: bool = False
    """Continue from out_dir/checkpoint.pt when it exists (otherwise start fresh)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    # --- distributed ---
    data_parallel: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    """Under torchrun: "auto" (DDP if torch.distributed is initialised, else one process), "ddp", "fsdp2", "none"."""


def validate(cfg: PPOConfig) -> None:
    """Raise ``ValueError`` listing every problem with ``cfg`` (call before any work)."""
    errors: List[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(name: str, value, allowed) -> None:
        need(value in allowed, f"{name} must be one of {tuple(allowed)}, got {value!r}")

    for name in ("steps", "batch", "samples_per_prompt", "minibatch_size", "epochs", "max_new_tokens"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
    if not errors:
        total = cfg.batch * cfg.samples_per_prompt
        need(
            total % cfg.minibatch_size == 0,
            f"batch × samples_per_prompt = {cfg.batch} × {cfg.samples_per_prompt} = {total} is not divisible "
            f"by minibatch_size = {cfg.minibatch_size}",
        )
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.value_lr is None or cfg.value_lr > 0, f"value_lr must be > 0 or None, got {cfg.value_lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.temperature > 0, f"temperature must be > 0, got {cfg.temperature}")
    need(cfg.clip_eps > 0, f"clip_eps must be > 0, got {cfg.clip_eps}")
    need(cfg.clip_eps_high is None or cfg.clip_eps_high > 0, f"clip_eps_high must be > 0, got {cfg.clip_eps_high}")
    need(cfg.dual_clip is None or cfg.dual_clip > 1, f"dual_clip must be > 1 or None, got {cfg.dual_clip}")
    need(cfg.entropy_coef >= 0, f"entropy_coef must be >= 0, got {cfg.entropy_coef}")
    one_of("loss_agg", cfg.loss_agg, LOSS_AGGREGATIONS)
    one_of("loss_backend", cfg.loss_backend, BACKENDS)
    one_of("kl_placement", cfg.kl_placement, KL_PLACEMENTS)
    one_of("kl_estimator", cfg.kl_estimator, KL_ESTIMATORS)
    one_of("advantage_estimator", cfg.advantage_estimator, ADVANTAGE_ESTIMATORS)
    need(cfg.kl_coef >= 0, f"kl_coef must be >= 0, got {cfg.kl_coef}")
    need(cfg.kl_target > 0, f"kl_target must be > 0 (a KL budget in nats per reply), got {cfg.kl_target}")
    need(cfg.kl_horizon > 0, f"kl_horizon must be > 0, got {cfg.kl_horizon}")
    need(
        not (cfg.adaptive_kl and cfg.kl_coef == 0),
        "adaptive_kl needs kl_coef > 0: the controller multiplies β, so β = 0 stays 0",
    )
    need(cfg.missing_eos_penalty >= 0, f"missing_eos_penalty must be >= 0, got {cfg.missing_eos_penalty}")
    need(cfg.length_penalty >= 0, f"length_penalty must be >= 0, got {cfg.length_penalty}")
    need(0 <= cfg.gamma <= 1, f"gamma must be in [0, 1], got {cfg.gamma}")
    need(0 <= cfg.lam <= 1, f"lam must be in [0, 1], got {cfg.lam}")
    if cfg.advantage_estimator in ("grpo", "rloo") and isinstance(cfg.samples_per_prompt, int):
        need(
            cfg.samples_per_prompt >= 2,
            f"advantage_estimator {cfg.advantage_estimator!r} compares replies to the same prompt: "
            f"samples_per_prompt must be >= 2, got {cfg.samples_per_prompt}",
        )
    need(cfg.vf_coef >= 0, f"vf_coef must be >= 0, got {cfg.vf_coef}")
    need(cfg.value_clip is None or cfg.value_clip > 0, f"value_clip must be > 0 or None, got {cfg.value_clip}")
    need(
        cfg.max_grad_norm is None or cfg.max_grad_norm > 0,
        f"max_grad_norm must be > 0 or None, got {cfg.max_grad_norm}",
    )
    need(
        cfg.early_stop_approx_kl is None or cfg.early_stop_approx_kl > 0,
        f"early_stop_approx_kl must be > 0 or None, got {cfg.early_stop_approx_kl}",
    )
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    one_of("data_parallel", cfg.data_parallel, distributed.DATA_PARALLEL_MODES)
    sizes_ok = all(isinstance(getattr(cfg, k), int) and getattr(cfg, k) >= 1
                   for k in ("batch", "samples_per_prompt", "minibatch_size"))
    if sizes_ok and cfg.data_parallel in distributed.DATA_PARALLEL_MODES and (
        distributed.resolve_data_parallel(cfg.data_parallel) is not None
    ):
        if not (dist.is_available() and dist.is_initialized()):
            errors.append(f"data_parallel={cfg.data_parallel!r} needs torch.distributed initialised (use torchrun)")
        else:
            world = dist.get_world_size()
            need(
                cfg.batch * cfg.samples_per_prompt % world == 0,
                f"batch × samples_per_prompt = {cfg.batch * cfg.samples_per_prompt} replies must split evenly "
                f"over {world} data-parallel ranks",
            )
            need(
                cfg.minibatch_size % world == 0,
                f"minibatch_size = {cfg.minibatch_size} must split evenly over {world} data-parallel ranks",
            )
    if cfg.use_fused_linear:
        need(
            importlib.util.find_spec("rlhf_fast.fused_linear") is not None,
            "use_fused_linear needs rlhf_fast.fused_linear (rf.fused_linear_ppo_loss), which is not installed",
        )
    if errors:
        raise ValueError("invalid PPOConfig:\n  - " + "\n  - ".join(errors))


# ----------------------------------------------------------------------------- records


class Samples(NamedTuple):
    """Sampled replies with their prompts, as :func:`sample_replies` returns them."""

    input_ids: torch.Tensor  # [B, P+R] prompt (left-padded) then reply (right-padded)
    attention_mask: torch.Tensor  # [B, P+R] long, 1 on prompt and reply tokens (EOS included)
    position_ids: torch.Tensor  # [B, P+R] positions counting valid tokens only
    prompt_len: int  # P
    response_ids: torch.Tensor  # [B, R] reply tokens (pad after EOS)
    response_mask: torch.Tensor  # [B, R] bool, True up to and including EOS
    lengths: torch.Tensor  # [B] long, reply length in tokens
    has_eos: torch.Tensor  # [B] bool, False when the reply hit max_new_tokens


class Rollout(NamedTuple):
    """One step's replies and everything computed from them before the update.

    The first eight fields are those of :class:`Samples`.
    ``B`` = batch × samples_per_prompt replies (the samples of a prompt are contiguous),
    ``P`` = prompt length (left-padded), ``R`` = longest reply (right-padded after EOS).
    """

    input_ids: torch.Tensor  # [B, P+R] prompt (left-padded) then reply (right-padded)
    attention_mask: torch.Tensor  # [B, P+R] long, 1 on prompt and reply tokens (EOS included)
    position_ids: torch.Tensor  # [B, P+R] positions counting valid tokens only
    prompt_len: int  # P
    response_ids: torch.Tensor  # [B, R] reply tokens (pad after EOS)
    response_mask: torch.Tensor  # [B, R] bool, True up to and including EOS
    lengths: torch.Tensor  # [B] long, reply length in tokens
    has_eos: torch.Tensor  # [B] bool, False when the reply hit max_new_tokens
    old_logprobs: torch.Tensor  # [B, R] fp32, sampling policy at τ, 0 at padding
    ref_logprobs: torch.Tensor  # [B, R] fp32, reference at τ, 0 at padding
    entropy: torch.Tensor  # [B, R] fp32, sampling policy's entropy at τ
    values: Optional[torch.Tensor]  # [B, R] critic values (GAE) or None
    raw_scores: torch.Tensor  # [B] reward model output
    norm_scores: torch.Tensor  # [B] raw scores normalised by the RM's calibration (= raw without one)
    scores: torch.Tensor  # [B] normalised (if asked) minus penalties
    rewards: torch.Tensor  # [B, R] per-token reward: −β·k1 (KL in reward) + score at the last token
    raw_advantages: torch.Tensor  # [B, R] (GAE) or [B] (GRPO, RLOO), before whitening
    advantages: torch.Tensor  # [B, R] (GAE) or [B] (GRPO, RLOO), as fed to the loss
    returns: Optional[torch.Tensor]  # [B, R] value targets (GAE) or None


@dataclass
class StepRecord:
    """What one step reports: ``step`` (1-based) and the flat ``metrics`` of :data:`METRICS`."""

    step: int
    metrics: Dict[str, float]

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.step, **self.metrics}


METRICS: Dict[str, str] = {
    "score_raw_mean": "reward-model score, raw, mean over replies",
    "score_raw_std": "reward-model score, raw, std over replies",
    "score_norm_mean": "reward-model score normalised by its calibration, mean",
    "score_norm_std": "reward-model score normalised by its calibration, std",
    "score_mean": "score entering the reward (normalised if asked, minus penalties), mean",
    "reward_mean": "total reward per reply (score − β·Σk1 when KL is in the reward), mean",
    "kl_ref_k1_sum": "KL to the reference, k1 summed over a reply, mean over replies (the controller's KL)",
    "kl_ref_k1_mean": "KL to the reference, k1 per token, mean over tokens",
    "kl_ref_k3_sum": "KL to the reference, k3 summed over a reply, mean over replies",
    "kl_ref_k3_mean": "KL to the reference, k3 per token, mean over tokens",
    "kl_coef": "β used in this step",
    "kl_coef_next": "β after the controller update",
    "loss_kl": "the loss's KL estimator (kl_estimator) of the updated policy, mean over updates",
    "pg_loss": "clipped surrogate, mean over updates",
    "clipfrac": "fraction of tokens whose surrogate is clipped, mean over updates",
    "clipfrac_lower": "fraction of tokens where the dual clip is active, mean over updates",
    "ratio_mean": "new/old probability ratio, mean over updates",
    "ratio_min": "smallest ratio seen in the step",
    "ratio_max": "largest ratio seen in the step",
    "ratio_above": "fraction of tokens with ratio > 1 + ε_high before clipping, mean over updates",
    "ratio_below": "fraction of tokens with ratio < 1 − ε_low before clipping, mean over updates",
    "approx_kl": "mean of (r − 1) − log r (old → new), mean over updates",
    "approx_kl_max": "largest minibatch approx_kl in the step",
    "entropy": "entropy of the sampling policy at τ, per token",
    "adv_mean": "advantage fed to the loss, mean (tokens for GAE, replies otherwise)",
    "adv_std": "advantage fed to the loss, std",
    "adv_max": "advantage fed to the loss, max",
    "adv_raw_std": "advantage before whitening, std",
    "adv_raw_max": "advantage before whitening, max |A|",
    "response_length_mean": "reply length in tokens (EOS included), mean",
    "response_length_max": "reply length, max",
    "frac_truncated": "fraction of replies that hit max_new_tokens without EOS",
    "score_length_corr": "Pearson correlation of raw score with reply length",
    "value_explained_var": "1 − Var(returns − values)/Var(returns) at rollout (0 without a critic)",
    "value_loss": "clipped value loss, mean over updates (0 without a critic)",
    "value_clipfrac": "fraction of tokens whose value update is clipped (0 without a critic)",
    "grad_norm": "gradient norm before clipping, mean over updates",
    "epochs_run": "minibatch updates done / minibatches per epoch (< epochs after an early stop)",
    "early_stopped": "1 when approx_kl > 1.5× early_stop_approx_kl stopped the epoch loop",
    "step_time_s": "wall time of the step",
}
"""Every key of :attr:`StepRecord.metrics` (``extra_metrics`` adds its own)."""


# ----------------------------------------------------------------------------- models


class ValueHead(nn.Module):
    """Scalar head on the policy's final hidden state (zero-initialised: V ≡ 0 at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...] in the head's dtype (fp32)
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def response_hidden(model: nn.Module, seqs: Union[Samples, Rollout], rows=None) -> torch.Tensor:
    """Final hidden states ``[B, R, H]`` at the positions that predict the reply tokens.

    Position ``P−1+t`` predicts reply token ``t``; the last input token is never needed.
    ``rows`` selects a minibatch.
    """
    ids, mask, pos = seqs.input_ids, seqs.attention_mask, seqs.position_ids
    if rows is not None:
        ids, mask, pos = ids[rows], mask[rows], pos[rows]
    body = getattr(model, "base_model", model)
    out = body(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1])
    return out.last_hidden_state[:, seqs.prompt_len - 1 :]


def _lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to score tokens with")
    return head


def _fused_linear():
    from . import fused_linear  # written separately; imported only when asked for

    return fused_linear


def token_logprobs(
    model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy ``[B, R]`` of ``targets`` at temperature τ (no grad)."""
    head = _lm_head(model)
    if cfg.use_fused_linear:
        return _fused_linear().fused_linear_logprobs(
            hidden, head.weight, targets, mask, temperature=cfg.temperature, with_entropy=True,
            bias=getattr(head, "bias", None), backend=cfg.loss_backend,
        )
    return functional.logprobs(
        head(hidden), targets, mask, temperature=cfg.temperature, with_entropy=True, backend=cfg.loss_backend
    )


def _vocab_size(model: nn.Module) -> Optional[int]:
    model = getattr(model, "backbone", model)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return getattr(embeddings, "num_embeddings", None)


def check_compatibility(
    policy: nn.Module,
    ref_policy: nn.Module,
    reward_model: nn.Module,
    eos_token_id: int,
    pad_token_id: int,
    policy_tokenizer=None,
    reward_tokenizer=None,
) -> None:
    """Fail early when the models cannot share token ids (different tokenizers or vocabularies)."""
    if policy_tokenizer is not None and reward_tokenizer is not None:
        policy_vocab, reward_vocab = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
        if policy_vocab != reward_vocab:
            differing = sorted(set(policy_vocab.items()) ^ set(reward_vocab.items()))[:5]
            raise ValueError(
                "the policy and reward-model tokenizers differ (token ids would mean different things); "
                f"{len(policy_vocab)} vs {len(reward_vocab)} tokens, e.g. differing entries {differing}"
            )
    sizes = {name: _vocab_size(m) for name, m in
             (("policy", policy), ("ref_policy", ref_policy), ("reward_model", reward_model))}
    if sizes["policy"] is not None and sizes["ref_policy"] is not None and sizes["policy"] != sizes["ref_policy"]:
        raise ValueError(
            f"policy and ref_policy have different vocabularies ({sizes['policy']} vs {sizes['ref_policy']} "
            "embeddings): the KL to the reference needs the same tokenizer"
        )
    if sizes["policy"] is not None and sizes["reward_model"] is not None and sizes["reward_model"] < sizes["policy"]:
        raise ValueError(
            f"the reward model's vocabulary ({sizes['reward_model']}) is smaller than the policy's "
            f"({sizes['policy']}): they use different tokenizers"
        )
    for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if not isinstance(token, int) or token < 0 or (sizes["policy"] is not None and token >= sizes["policy"]):
            raise ValueError(f"{name} must be a token id in [0, {sizes['policy']}), got {token!r}")


# ----------------------------------------------------------------------------- helpers


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → ``(ids [N, L], mask [N, L])`` padded on the left (as ``generate`` wants)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def _prompt_lists(prompts) -> List[List[int]]:
    if isinstance(prompts, (tuple, list)) and len(prompts) == 2 and all(isinstance(p, torch.Tensor) for p in prompts):
        ids, mask = prompts
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in prompts]
    return [list(map(int, p)) for p in prompts]


@torch.no_grad()
def sample_replies(
    policy: nn.Module, prompt_lists: List[List[int]], cfg: PPOConfig, eos_token_id: int, pad_token_id: int,
    synced_gpus: bool = False,
) -> Samples:
    """One reply per prompt row: ``generate`` with do_sample at τ, no top-k / top-p, up to max_new_tokens.

    ``synced_gpus``: every rank runs forwards until all ranks are done (sharded parameters, FSDP2).
    """
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompt_lists, pad_token_id))
    generation = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    synced = {"synced_gpus": True} if synced_gpus else {}
    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation, **synced)
    prompt_len = prompt_ids.shape[1]
    response = out[:, prompt_len:]
    width = response.shape[1]
    is_eos = response == eos_token_id
    has_eos = is_eos.any(dim=1)
    lengths = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, torch.full_like(has_eos, width, dtype=torch.long))
    response_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    response = torch.where(response_mask, response, torch.full_like(response, pad_token_id))
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Samples(
        torch.cat([prompt_ids, response], dim=1), attention_mask, position_ids_from_mask(attention_mask),
        prompt_len, response, response_mask, lengths, has_eos,
    )


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else 0.0


def _std(x: torch.Tensor) -> float:
    return float(x.float().std()) if x.numel() > 1 else 0.0


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


class _UpdateStats:
    """Accumulates per-minibatch loss metrics into the step's summary."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.ratio_min, self.ratio_max, self.approx_kl_max = math.inf, -math.inf, -math.inf

    def add(self, metrics: Dict[str, torch.Tensor], extra: Dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.ratio_min = min(self.ratio_min, values.pop("ratio_min"))
        self.ratio_max = max(self.ratio_max, values.pop("ratio_max"))
        self.approx_kl_max = max(self.approx_kl_max, values["approx_kl"])
        values.update(extra)
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def summary(self) -> Dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        if "kl" in out:
            out["loss_kl"] = out.pop("kl")
        out.pop("entropy", None)  # the step reports the sampling policy's entropy instead
        out.update(ratio_min=self.ratio_min, ratio_max=self.ratio_max, approx_kl_max=self.approx_kl_max)
        return out


# ----------------------------------------------------------------------------- the phases of a step


def choose_prompts(prompt_lists: List[List[int]], cfg: PPOConfig, step: int) -> List[List[int]]:
    """The step's ``batch`` prompts, each repeated ``samples_per_prompt`` times (contiguously).

    Seeded by (seed, step) alone, so a resumed run picks the same prompts without extra state.
    """
    chooser = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    chosen = torch.randperm(len(prompt_lists), generator=chooser)[: cfg.batch].tolist()
    return [prompt_lists[i] for i in chosen for _ in range(cfg.samples_per_prompt)]


class _Scored(NamedTuple):
    """A rollout's per-reply data before rewards and advantages (gathered across data-parallel ranks)."""

    samples: Samples
    old_logprobs: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor  # [B, R]
    entropy: torch.Tensor  # [B, R]
    values: Optional[torch.Tensor]  # [B, R] or None
    raw_scores: torch.Tensor  # [B]
    norm_scores: torch.Tensor  # [B]


@torch.no_grad()
def collect_rollout(
    cfg: PPOConfig,
    policy: nn.Module,
    ref_policy: nn.Module,
    reward_model: nn.Module,
    critic: Optional[nn.Module],
    step_prompts: List[List[int]],
    beta: float,
    eos_token_id: int,
    pad_token_id: int,
    dp: Optional[distributed.DataParallel] = None,
) -> Rollout:
    """Sample, score and compute advantages for one step (no gradients).

    The models should be in eval mode (:func:`train` sets it): with dropout on, the
    old log-probs would not match the update's first forward. With ``dp``, ``step_prompts``
    are this rank's and the returned rollout is the global one (every rank's replies, in
    rank order): rewards and advantages are computed on it as in one process.
    """
    if cfg.advantage_estimator == "gae" and critic is None:
        raise ValueError("advantage_estimator='gae' needs a critic (a ValueHead or a value model)")
    if dp is None:
        scored = _sample_and_score(policy, critic, cfg, ref_policy, reward_model, step_prompts,
                                   eos_token_id, pad_token_id)
    else:
        scored = dp.no_grad_call(_sample_and_score, cfg, ref_policy, reward_model, step_prompts, eos_token_id,
                                 pad_token_id, dp.kind == "fsdp2")
        scored = _gather_scored(scored, dp.group, pad_token_id)
    return _rewards_and_advantages(cfg, scored, beta)


def _sample_and_score(
    policy: nn.Module, critic: Optional[nn.Module], cfg: PPOConfig, ref_policy: nn.Module, reward_model: nn.Module,
    step_prompts: List[List[int]], eos_token_id: int, pad_token_id: int, synced_gpus: bool = False,
) -> _Scored:
    """Steps 1–3 of a rollout on these prompts: replies, log-probs, values, reward-model scores."""
    # 1. sample replies at τ
    seqs = sample_replies(policy, step_prompts, cfg, eos_token_id, pad_token_id, synced_gpus)
    response_ids, response_mask = seqs.response_ids, seqs.response_mask

    # 2. old / reference log-probs at the same τ, and values of the states before each token
    hidden = response_hidden(policy, seqs)
    old_logprobs, entropy = token_logprobs(policy, hidden, response_ids, response_mask, cfg)
    ref_hidden = response_hidden(ref_policy, seqs)
    ref_logprobs, _ = token_logprobs(ref_policy, ref_hidden, response_ids, response_mask, cfg)
    values = critic_values(critic, hidden, seqs) * response_mask if critic is not None else None

    # 3. score: reward model at the end (normalised if asked, below)
    raw_scores = reward_model(seqs.input_ids, seqs.attention_mask).float()
    norm_scores = reward_model.normalize(raw_scores) if hasattr(reward_model, "normalize") else raw_scores
    return _Scored(seqs, old_logprobs, ref_logprobs, entropy, values, raw_scores, norm_scores)


def _gather_scored(local: _Scored, group, pad_token_id: int) -> _Scored:
    """Every rank's :class:`_Scored` in rank order, re-padded to the global prompt and reply widths.

    Prompts stay left-padded and replies right-padded (pad id, mask 0, zeros in the per-token
    tensors), as one process's ``generate`` over all prompts lays them out.
    """
    seqs = local.samples
    device = seqs.input_ids.device
    prompt_len, reply_len = distributed.max_over_ranks([seqs.prompt_len, seqs.response_ids.shape[1]], device, group)

    def rows(t, width=None, left=False, value=0):
        return distributed.all_gather_rows(t, group, width, left, value)

    def sequence(t, value):  # [b, P + R]: prompt part left-padded, reply part right-padded
        return torch.cat([rows(t[:, : seqs.prompt_len], prompt_len, True, value),
                          rows(t[:, seqs.prompt_len :], reply_len, False, value)], dim=1)

    attention_mask = sequence(seqs.attention_mask, 0)
    samples = Samples(
        sequence(seqs.input_ids, pad_token_id), attention_mask, position_ids_from_mask(attention_mask), prompt_len,
        rows(seqs.response_ids, reply_len, value=pad_token_id), rows(seqs.response_mask, reply_len, value=False),
        rows(seqs.lengths), rows(seqs.has_eos),
    )
    return _Scored(
        samples, rows(local.old_logprobs, reply_len), rows(local.ref_logprobs, reply_len),
        rows(local.entropy, reply_len), None if local.values is None else rows(local.values, reply_len),
        rows(local.raw_scores), rows(local.norm_scores),
    )


def _rewards_and_advantages(cfg: PPOConfig, scored: _Scored, beta: float) -> Rollout:
    """Steps 3–5 of a rollout: shaped scores, per-token rewards, advantages."""
    seqs, old_logprobs, ref_logprobs = scored.samples, scored.old_logprobs, scored.ref_logprobs
    response_mask, lengths, has_eos = seqs.response_mask, seqs.lengths, seqs.has_eos
    raw_scores, norm_scores, values = scored.raw_scores, scored.norm_scores, scored.values
    # 3. the score entering the reward: normalised if asked, minus penalties
    scores = norm_scores if cfg.reward_normalize else raw_scores
    scores = scores - cfg.missing_eos_penalty * (~has_eos).float() - cfg.length_penalty * lengths.float()

    # 4. per-token reward: −β·k1 to the reference (KL in the reward), plus the score at the last token
    k1 = (old_logprobs - ref_logprobs) * response_mask
    rewards = -(beta if cfg.kl_placement == "reward" else 0.0) * k1
    rows = torch.arange(len(lengths), device=rewards.device)
    rewards[rows, lengths - 1] += scores

    # 5. advantages: per token (GAE) or per reply (GRPO, RLOO), then whitening
    returns = None
    if cfg.advantage_estimator == "gae":
        raw_advantages, returns = gae_advantages(rewards, values, response_mask, cfg.gamma, cfg.lam)
        advantages = whiten(raw_advantages, response_mask) if cfg.whiten else raw_advantages
    else:
        reply_rewards = rewards.sum(dim=1)
        if cfg.advantage_estimator == "grpo":
            raw_advantages = grpo_advantages(reply_rewards, cfg.samples_per_prompt, cfg.group_std_normalize)
        else:
            raw_advantages = rloo_advantages(reply_rewards, cfg.samples_per_prompt)
        advantages = whiten(raw_advantages) if cfg.whiten else raw_advantages
    return Rollout(
        *seqs, old_logprobs, ref_logprobs, scored.entropy, values, raw_scores, norm_scores, scores, rewards,
        raw_advantages, advantages, returns,
    )


def ppo_update(
    cfg: PPOConfig,
    policy: nn.Module,
    critic: Optional[nn.Module],
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    beta: float,
    *,
    generator: Optional[torch.Generator] = None,
    dp: Optional[distributed.DataParallel] = None,
) -> Dict[str, float]:
    """Epochs × minibatches of the PPO loss (+ clipped value loss) on one rollout.

    Stops early when a minibatch's approx_kl exceeds 1.5 × ``early_stop_approx_kl``.
    Returns the update's metrics (loss metrics averaged over minibatches).
    ``generator`` draws the minibatch order (default: torch's global RNG).

    With ``dp``, ``rollout`` is the global one (every rank holds it) and so is the order:
    each global minibatch of ``minibatch_size`` replies is split into contiguous per-rank
    parts, each normalised by the global minibatch, so the summed gradient and the
    combined metrics equal one process's on the same minibatch.
    """
    stats = _UpdateStats()
    n_replies = rollout.response_ids.shape[0]
    device = rollout.response_ids.device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    updates, early_stopped = 0, False
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n_replies, generator=generator).to(device)
        for start in range(0, n_replies, cfg.minibatch_size):
            rows = order[start : start + cfg.minibatch_size]
            if dp is None:
                loss, out, extra = _minibatch_loss(policy, critic, rollout, rows, beta, cfg)
            else:
                part = rows[distributed.shard_slice(len(rows), dp.rank, dp.world)]
                loss, out, extra = dp.module(_minibatch_loss, rollout, part, beta, cfg, rows)
                loss = loss * dp.world  # DDP and FSDP2 average gradients; the parts are shares of one loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            extra["grad_norm"] = float(grad_norm) if dp is None else distributed.grad_norm_value(grad_norm)
            optimizer.step()
            updates += 1
            metrics = out.metrics
            if dp is not None:  # the global minibatch's metrics, identical on every rank
                value_keys = [k for k in ("value_loss", "value_clipfrac") if k in extra]
                combined = distributed.all_reduce_minibatch_metrics(
                    out.metrics, {k: extra[k] for k in value_keys}, rollout.response_mask[part].sum(), dp.group)
                metrics = {k: combined[k] for k in out.metrics}
                extra.update({k: float(combined[k]) for k in value_keys})
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


def _minibatch_loss(
    policy: nn.Module, critic: Optional[nn.Module], rollout: Rollout, rows: torch.Tensor, beta: float,
    cfg: PPOConfig, global_rows: Optional[torch.Tensor] = None,
):
    """Loss of minibatch ``rows``: ``(loss, PPOLossOutput, extra)``; extra holds the value-loss floats.

    ``global_rows`` (data parallel): ``rows`` are this rank's part of that minibatch, and the
    loss is its share of the minibatch's loss (see :mod:`rlhf_fast.distributed`); the value
    loss and clipfrac in ``extra`` are then shares too (0-d tensors, summed over ranks).
    """
    hidden = response_hidden(policy, rollout, rows)
    num_tokens = scale = None
    if global_rows is not None:
        num_tokens = rollout.response_mask[global_rows].sum().clamp_min(1)
        scale = distributed.global_loss_scale(cfg.loss_agg, rollout.response_mask, rows, global_rows)
    out = policy_loss(policy, hidden, rollout, rows, beta, cfg,
                      global_num_tokens=num_tokens if cfg.loss_agg == "token-mean" else None)
    if scale is not None:
        out = out._replace(loss=out.loss * scale)
    loss, extra = out.loss, {}
    if critic is not None:
        value_loss, value_clipfrac = clipped_value_loss(
            critic_values(critic, hidden, rollout, rows), rollout.values[rows], rollout.returns[rows],
            rollout.response_mask[rows], cfg.value_clip, num_tokens,
        )
        loss = loss + cfg.vf_coef * value_loss
        if global_rows is None:
            extra.update(value_loss=float(value_loss.detach()), value_clipfrac=float(value_clipfrac))
        else:
            extra.update(value_loss=value_loss.detach(), value_clipfrac=value_clipfrac)
    return loss, out, extra


def rollout_metrics(rollout: Rollout, cfg: PPOConfig) -> Dict[str, float]:
    """The diagnostics of :data:`METRICS` that come from the rollout itself."""
    mask = rollout.response_mask
    mask_f = mask.float()
    n_tokens = mask_f.sum().clamp(min=1.0)
    k1 = (rollout.old_logprobs - rollout.ref_logprobs) * mask_f
    k3 = (torch.exp(-k1) + k1 - 1.0) * mask_f
    per_token = cfg.advantage_estimator == "gae"
    advantages = rollout.advantages[mask] if per_token else rollout.advantages
    raw_advantages = rollout.raw_advantages[mask] if per_token else rollout.raw_advantages
    lengths = rollout.lengths
    return {
        "score_raw_mean": float(rollout.raw_scores.mean()), "score_raw_std": _std(rollout.raw_scores),
        "score_norm_mean": float(rollout.norm_scores.mean()), "score_norm_std": _std(rollout.norm_scores),
        "score_mean": float(rollout.scores.mean()), "reward_mean": float(rollout.rewards.sum(dim=1).mean()),
        "kl_ref_k1_sum": float(k1.sum(dim=1).mean()), "kl_ref_k1_mean": float(k1.sum() / n_tokens),
        "kl_ref_k3_sum": float(k3.sum(dim=1).mean()), "kl_ref_k3_mean": float(k3.sum() / n_tokens),
        "entropy": float((rollout.entropy * mask_f).sum() / n_tokens),
        "adv_mean": float(advantages.mean()), "adv_std": _std(advantages), "adv_max": float(advantages.max()),
        "adv_raw_std": _std(raw_advantages), "adv_raw_max": float(raw_advantages.abs().max()),
        "response_length_mean": float(lengths.float().mean()), "response_length_max": float(lengths.max()),
        "frac_truncated": float((~rollout.has_eos).float().mean()),
        "score_length_corr": _pearson(rollout.raw_scores, lengths),
        "value_explained_var": (
            explained_variance(rollout.values, rollout.returns, mask) if rollout.values is not None else 0.0
        ),
    }


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: PPOConfig,
    policy: nn.Module,
    ref_policy: nn.Module,
    reward_model: nn.Module,
    prompts: Union[Sequence[Sequence[int]], Tuple[torch.Tensor, torch.Tensor]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    value_model: Optional[nn.Module] = None,
    extra_metrics: Optional[Callable[[List[List[int]], List[List[int]]], Dict[str, float]]] = None,
    log_fn: Optional[Callable[[StepRecord], None]] = None,
    policy_tokenizer=None,
    reward_tokenizer=None,
) -> List[StepRecord]:
    """Run PPO for ``cfg.steps`` steps (continuing a checkpoint with ``cfg.resume``); the policy is updated in place.

    prompts: token-id lists, or ``(ids [N, L], mask [N, L])``. reward_model: a
    :class:`~rlhf_fast.reward.RewardModel` (or any ``(input_ids, attention_mask) -> [B]``
    module; ``reward_normalize`` needs its ``normalize``). value_model: a separate critic
    with ``values(input_ids, attention_mask, position_ids) -> [B, L]`` (e.g. a copy of
    the reward model); without one, GAE puts a :class:`ValueHead` on the policy's hidden
    state. extra_metrics(prompt_ids, response_ids) receives unpadded token lists (replies
    include EOS) and its floats join each step's metrics. log_fn(record) is called after
    each step. Returns the records of all steps so far (resumed ones included).

    Data parallel (``cfg.data_parallel``, under torchrun; see :mod:`rlhf_fast.distributed`):
    every rank calls ``train`` with the same arguments and models on its own device; each
    samples its part of the step's prompts, the update runs on DDP/FSDP2 with gradients of
    the global batch, every rank returns the same records, rank 0 writes ``metrics.jsonl``
    and the progress bar, and checkpoints are ``torch.distributed.checkpoint`` directories
    (``out_dir/checkpoint``) that resume under any world size. extra_metrics runs on rank 0
    over the global batch; log_fn runs on every rank.
    """
    # --- checks: everything that can fail does so before any work ---
    validate(cfg)
    prompt_lists = _prompt_lists(prompts)
    if len(prompt_lists) < cfg.batch:
        raise ValueError(f"batch = {cfg.batch} prompts per step, but only {len(prompt_lists)} prompts were given")
    if any(len(p) == 0 for p in prompt_lists):
        raise ValueError("every prompt needs at least one token")
    check_compatibility(policy, ref_policy, reward_model, eos_token_id, pad_token_id,
                        policy_tokenizer, reward_tokenizer)
    if cfg.reward_normalize and not hasattr(reward_model, "normalize"):
        raise ValueError("reward_normalize=True needs a reward model with normalize() (see reward.calibrate)")
    if cfg.reward_normalize and not getattr(reward_model, "is_calibrated", True):
        raise ValueError("reward_normalize=True but the reward model is not calibrated: run reward.calibrate first")
    from tqdm.auto import tqdm

    # --- setup ---
    seed_everything(cfg.seed)
    for model in (policy, ref_policy, reward_model):
        model.eval()  # dropout off: the ratio of the first minibatch is exactly 1
    critic = None
    if cfg.advantage_estimator == "gae":
        critic = value_model if value_model is not None else ValueHead(_lm_head(policy).weight.shape[1])
        critic.to(next(policy.parameters()).device).eval()
    dp_kind = distributed.resolve_data_parallel(cfg.data_parallel)
    dp = distributed.wrap(policy, critic, dp_kind) if dp_kind is not None else None  # before the optimizer
    is_main = dp is None or dp.is_main
    param_groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
    if critic is not None:
        param_groups.append({"params": [p for p in critic.parameters() if p.requires_grad],
                             "lr": cfg.value_lr or cfg.lr})
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))

    # --- resume ---
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    checkpoint_path = os.path.join(cfg.out_dir, "checkpoint.pt" if dp is None else "checkpoint")
    records: List[StepRecord] = []
    start_step = 0
    if cfg.resume:
        _check_checkpoint_kind(cfg.out_dir, dp is not None)
    if cfg.resume and dp is not None and latest_sharded(checkpoint_path) is not None:
        step_dir = latest_sharded(checkpoint_path)
        state = load_checkpoint(os.path.join(step_dir, "meta.pt"))
        _check_same_config(state["config"], cfg)
        load_sharded(step_dir, dp.models, optimizer, dp.group)
        kl_ctl.load_state_dict(state["kl_controller"])
        start_step = state["step"]  # no RNG state: under torch.distributed it derives from (seed, step, rank)
        records = [StepRecord(r["step"], r["metrics"]) for r in state["records"]]
    elif cfg.resume and dp is None and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path)
        _check_same_config(state["config"], cfg)
        policy.load_state_dict(state["policy"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
        optimizer.load_state_dict(state["optimizer"])
        kl_ctl.load_state_dict(state["kl_controller"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        records = [StepRecord(r["step"], r["metrics"]) for r in state["records"]]
    # metrics.jsonl holds exactly the checkpointed steps (drops lines of steps lost in a crash)
    if is_main:
        atomic_write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), metrics_path)

    bar = tqdm(total=cfg.steps, initial=start_step, desc="ppo", disable=not (cfg.progress and is_main))
    for step in range(start_step, cfg.steps):
        started = time.perf_counter()
        beta = kl_ctl.value
        step_prompts = choose_prompts(prompt_lists, cfg, step)
        if dp is None:
            rollout = collect_rollout(cfg, policy, ref_policy, reward_model, critic, step_prompts, beta,
                                      eos_token_id, pad_token_id)
            update_metrics = ppo_update(cfg, policy, critic, optimizer, rollout, beta)
        else:  # this rank samples its slice of the prompts; the rollout comes back global
            torch.manual_seed(distributed.derived_seed(cfg.seed, step, dp.rank))
            local_prompts = step_prompts[distributed.shard_slice(len(step_prompts), dp.rank, dp.world)]
            rollout = collect_rollout(cfg, policy, ref_policy, reward_model, critic, local_prompts, beta,
                                      eos_token_id, pad_token_id, dp=dp)
            order = torch.Generator().manual_seed(distributed.derived_seed(cfg.seed, step, -1))
            update_metrics = ppo_update(cfg, policy, critic, optimizer, rollout, beta, generator=order, dp=dp)

        # KL controller: the target is the KL per reply (k1 summed over tokens, mean over replies)
        metrics = rollout_metrics(rollout, cfg)
        kl_ctl.update(metrics["kl_ref_k1_sum"], len(step_prompts))
        metrics.update(update_metrics, kl_coef=beta, kl_coef_next=kl_ctl.value)
        from_main = {}  # computed by rank 0 alone
        if extra_metrics is not None and is_main:
            responses = [r[m].tolist() for r, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
            from_main.update({k: float(v) for k, v in extra_metrics(step_prompts, responses).items()})
        from_main["step_time_s"] = time.perf_counter() - started
        if dp is not None:  # every rank returns the same records
            from_main = distributed.broadcast_object(from_main, dp.group)
        metrics.update(from_main)

        # diagnostics: metrics.jsonl, progress bar, callback, checkpoint (atomic)
        record = StepRecord(step + 1, metrics)
        records.append(record)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record.to_dict()) + "\n")
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score_raw_mean']:.3f}", kl=f"{metrics['kl_ref_k1_sum']:.2f}",
                        beta=f"{beta:.3g}", len=f"{metrics['response_length_mean']:.1f}",
                        clip=f"{metrics['clipfrac']:.2f}")
        if log_fn is not None:  # before the checkpoint: RNG it draws is captured, so resume stays exact
            log_fn(record)
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps) and dp:
            save_sharded(
                checkpoint_path, step + 1, dp.models, optimizer,
                {"step": step + 1, "config": dataclasses.asdict(cfg), "kl_controller": kl_ctl.state_dict(),
                 "records": [{"step": r.step, "metrics": r.metrics} for r in records]},
                dp.group,
            )
        elif cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            atomic_save(
                {"step": step + 1, "config": dataclasses.asdict(cfg), "policy": policy.state_dict(),
                 "critic": critic.state_dict() if critic is not None else None,
                 "optimizer": optimizer.state_dict(), "kl_controller": kl_ctl.state_dict(), "rng": rng_state(),
                 "records": [{"step": r.step, "metrics": r.metrics} for r in records]},
                checkpoint_path,
            )
    bar.close()
    return records


def critic_values(critic: nn.Module, hidden: torch.Tensor, seqs: Union[Samples, Rollout], rows=None) -> torch.Tensor:
    """Values ``[B, R]`` of the states before each reply token.

    A :class:`ValueHead` reads the policy's ``hidden`` ``[B, R, H]``; a separate critic
    runs its own forward over the sequences (``rows`` selects a minibatch).
    """
    if isinstance(critic, ValueHead):
        return critic(hidden)
    ids, mask, pos = seqs.input_ids, seqs.attention_mask, seqs.position_ids
    if rows is not None:
        ids, mask, pos = ids[rows], mask[rows], pos[rows]
    return critic.values(ids[:, :-1], mask[:, :-1], pos[:, :-1])[:, seqs.prompt_len - 1 :]


def policy_loss(policy: nn.Module, hidden: torch.Tensor, rollout: Rollout, rows, beta: float, cfg: PPOConfig,
                global_num_tokens: Optional[torch.Tensor] = None):
    """``rf.ppo_loss`` (or its fused-linear twin) on minibatch ``rows`` of the rollout, all options from cfg.

    ``global_num_tokens``: the token-mean denominator when ``rows`` are one rank's part of a minibatch.
    """
    targets, mask = rollout.response_ids[rows], rollout.response_mask[rows]
    args = (targets, rollout.advantages[rows], rollout.old_logprobs[rows], rollout.ref_logprobs[rows], mask)
    options = dict(
        clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
        kl_coef=beta if cfg.kl_placement == "loss" else 0.0,  # ref is always passed: the KL metric is free
        kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
        loss_agg=cfg.loss_agg, backend=cfg.loss_backend,
    )
    if global_num_tokens is not None:
        options["global_num_tokens"] = global_num_tokens
    head = _lm_head(policy)
    if cfg.use_fused_linear:
        bias = getattr(head, "bias", None)
        return _fused_linear().fused_linear_ppo_loss(hidden, head.weight, *args, bias=bias, **options)
    return functional.ppo_loss(head(hidden), *args, **options)


_RESUMABLE_CHANGES = {"steps", "resume", "progress", "checkpoint_every", "out_dir", "data_parallel"}


def _check_checkpoint_kind(out_dir: str, sharded: bool) -> None:
    """A single-process checkpoint.pt and a torch.distributed one are not interchangeable."""
    single = os.path.exists(os.path.join(out_dir, "checkpoint.pt"))
    dcp_dir = latest_sharded(os.path.join(out_dir, "checkpoint")) is not None
    if sharded and single and not dcp_dir:
        raise ValueError(
            f"cannot resume: {out_dir} holds a single-process checkpoint.pt; resume it without torch.distributed "
            "(or set data_parallel='none')"
        )
    if not sharded and dcp_dir and not single:
        raise ValueError(
            f"cannot resume: {out_dir} holds a torch.distributed checkpoint (checkpoint/); resume it under torchrun "
            "(--nproc_per_node 1 works)"
        )


def _check_same_config(saved: Dict[str, Any], cfg: PPOConfig) -> None:
    current = dataclasses.asdict(cfg)
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"cannot resume: the config differs from the checkpoint's ({details})")


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Options of ``python -m rlhf_fast ppo``: model paths, then every PPOConfig field."""
    from .cli import add_dataclass_arguments

    io = parser.add_argument_group("inputs")
    io.add_argument("--policy", required=True, help="directory of a saved causal LM (save_pretrained)")
    io.add_argument("--ref-policy", default=None, help="directory of the reference LM (default: --policy)")
    io.add_argument("--reward-model", required=True, help="directory written by reward.save_reward_model")
    io.add_argument("--prompts", required=True,
                    help="JSONL file: one prompt per line, a list of token ids or {'input_ids': [...]}")
    io.add_argument("--eos-token-id", type=int, default=None, help="default: the policy config's eos_token_id")
    io.add_argument("--pad-token-id", type=int, default=None, help="default: the policy config's, else EOS")
    io.add_argument("--tokenizer", default=None, help="policy tokenizer directory (checked against the RM's)")
    io.add_argument("--reward-tokenizer", default=None, help="reward-model tokenizer directory")
    add_dataclass_arguments(parser, PPOConfig)


def _read_prompts(path: str) -> List[List[int]]:
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                prompts.append(list(item["input_ids"] if isinstance(item, dict) else item))
    return prompts


def main(args) -> int:
    """Entry point of ``python -m rlhf_fast ppo``: trains, then saves the policy to out_dir/policy.

    Under ``torchrun`` it joins the process group first (NCCL on ``cuda:LOCAL_RANK``, gloo on
    CPU) and trains data-parallel (``--data-parallel``); rank 0 prints and saves.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cli import dataclass_from_args
    from .reward import load_reward_model

    cfg = dataclass_from_args(PPOConfig, args)
    joins_group = not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env()  # None unless launched by torchrun
    validate(cfg)
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.ref_policy or args.policy)
    reward_model = load_reward_model(args.reward_model)
    if device is not None:
        for model in (policy, ref_policy, reward_model):
            model.to(device)
    eos = args.eos_token_id if args.eos_token_id is not None else policy.config.eos_token_id
    pad = args.pad_token_id if args.pad_token_id is not None else policy.config.pad_token_id
    pad = eos if pad is None else pad
    policy_tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    reward_tok = AutoTokenizer.from_pretrained(args.reward_tokenizer) if args.reward_tokenizer else None
    records = train(cfg, policy, ref_policy, reward_model, _read_prompts(args.prompts), eos_token_id=eos,
                    pad_token_id=pad, policy_tokenizer=policy_tok, reward_tokenizer=reward_tok)
    policy_dir = os.path.join(cfg.out_dir, "policy")
    if distributed.resolve_data_parallel(cfg.data_parallel) is None:
        policy.save_pretrained(policy_dir)
        is_main = True
    else:
        weights = distributed.full_state_dict(policy)  # collective (FSDP2 gathers the shards); rank 0 gets it
        is_main = dist.get_rank() == 0
        if is_main:
            policy.save_pretrained(policy_dir, state_dict=weights)
    if records and is_main:
        print(json.dumps(records[-1].to_dict()))
    if device is not None and joins_group:
        dist.destroy_process_group()
    return 0
