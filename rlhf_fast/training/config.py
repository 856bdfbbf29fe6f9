"""``PPOConfig``: every knob of the PPO loop, with one line of help per field.

A :class:`PPOConfig` *is* a :class:`~rlhf_fast.LossOptions` (it inherits the loss options,
written once there) plus the loop's own settings. It is frozen and validated at
construction, listing every problem at once; :func:`validate` adds the checks that depend
on the run's environment (torch.distributed). ``python -m rlhf_fast ppo --help`` shows
each field's help.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

import torch.distributed as dist

from ..backends import BACKENDS
from ..loss.options import LossOptions, option
from . import distributed
from .advantages import ADVANTAGE_ESTIMATORS

KL_PLACEMENTS = ("reward", "loss")
LR_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class PPOConfig(LossOptions):
    """Every knob of :func:`rlhf_fast.train_ppo` (the loss options are inherited from LossOptions)."""

    # --- the loss options that mean more here ---
    kl_coef: float = option(0.05, "β: the initial (adaptive) or fixed KL coefficient.")
    temperature: float = option(
        1.0, "Sampling temperature τ; the same τ divides the logits in the log-probs and the loss.")
    # --- run ---
    seed: int = option(0, "Seed of torch, python and numpy RNGs (sampling, minibatch order) and of prompt selection.")
    steps: int = option(100, "Number of PPO steps (rollout + update) in the whole run.")
    batch: int = option(8, "Prompts per step.")
    samples_per_prompt: int = option(
        1, "Replies sampled per prompt (≥ 2 for GRPO and RLOO); a step has batch × samples_per_prompt replies.")
    minibatch_size: int = option(8, "Replies per optimiser step; must divide batch × samples_per_prompt.")
    epochs: int = option(1, "Passes over the step's replies (PPO epochs).")
    lr: float = option(1e-5, "AdamW learning rate of the policy.")
    value_lr: Optional[float] = option(None, "Learning rate of the value head or critic (None = lr).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    lr_schedule: Literal["constant", "linear"] = option(
        "constant", "Learning rates over the run: constant, or linear decay from lr (and value_lr) at the first "
                    "step toward 0 after the last (cleanrl's anneal_lr; TRL's default scheduler).")
    # --- sampling ---
    max_new_tokens: int = option(32, "Length limit of a reply, in tokens (EOS included).")
    # --- loss execution ---
    loss_backend: Literal["auto", "triton", "cpp", "eager"] = option("auto", "Backend of rf.ppo_loss / rf.logprobs.")
    use_fused_linear: bool = option(
        False, "Use rf.fused_linear_ppo_loss / rf.fused_linear_logprobs on hidden states (never builds the logits).")
    # --- KL to the reference ---
    kl_placement: Literal["reward", "loss"] = option(
        "reward", '"reward": −β·k1 per token in the reward; "loss": β·kl_estimator in the PPO loss.')
    adaptive_kl: bool = option(False, "Adapt β toward kl_target (Ziegler et al. 2019) instead of keeping it fixed.")
    kl_target: float = option(6.0, "Target of the adaptive controller: KL to the reference per reply (sum, nats).")
    kl_horizon: float = option(10000.0, "Horizon H of the adaptive controller, in replies: β ← β·(1 + e·n/H).")
    kl_coef_min: Optional[float] = option(
        None, "Floor of the adaptive β (None = no floor). Set to kl_coef, kl_target is a ceiling: β rises to hold "
              "it and never falls below its start, so a policy is not pushed to spend a budget nothing was worth.")
    # --- reward shaping ---
    reward_normalize: bool = option(
        False, "Use the reward model's calibration: (score − mean) / std on reference samples.")
    missing_eos_penalty: float = option(
        0.0, "Subtracted from the score of a reply that hits max_new_tokens without EOS.")
    length_penalty: float = option(0.0, "Subtracted from the score once per reply token.")
    # --- advantages ---
    advantage_estimator: str = option("gae", "Advantage estimator: one of ADVANTAGE_ESTIMATORS (gae needs a critic).")
    gamma: float = option(1.0, "GAE discount γ.")
    lam: float = option(0.95, "GAE λ.")
    whiten: bool = option(True, "Whiten advantages over the step (valid tokens for GAE, replies for GRPO/RLOO).")
    group_std_normalize: bool = option(True, "GRPO: divide by the group's std (False = centre only, as Dr. GRPO).")
    # --- value function ---
    vf_coef: float = option(0.1, "Weight of the value loss.")
    value_clip: Optional[float] = option(0.2, "Clip of the value update around the rollout values (None = unclipped).")
    # --- optimisation ---
    max_grad_norm: Optional[float] = option(1.0, "Gradient-norm clip over policy and critic (None = off).")
    early_stop_approx_kl: Optional[float] = option(
        None, "Target approx-KL: stop the epoch loop when a minibatch's approx_kl > 1.5× this (None = off).")
    # --- output ---
    out_dir: str = option("runs/ppo", "Directory of metrics.jsonl and the checkpoints.")
    checkpoint_every: int = option(0, "Write a checkpoint every this many steps and at the end (0 = never).")
    resume: bool = option(False, "Continue from the checkpoint in out_dir when there is one (otherwise start fresh).")
    progress: bool = option(True, "Show a tqdm progress bar.")
    # --- reward-hacking monitor ---
    monitor: bool = option(
        True, "Run the reward-hacking monitor at every step (rlhf_fast.monitor): its warnings and alarms go to the "
              "progress display and to metrics.jsonl (key 'monitor'). It reads metrics the step computes anyway.")
    stop_on_alarm: bool = option(
        False, "Stop the run after the step at which the monitor raises an alarm (its checkpoint is written first "
               "when checkpoint_every > 0); needs monitor.")
    # --- distributed ---
    data_parallel: Literal["auto", "none", "ddp", "fsdp2"] = option(
        "auto", 'Under torchrun: "auto" (DDP if torch.distributed is initialised), "ddp", "fsdp2" or "none".')

    def problems(self) -> List[str]:
        """The loss options' problems and the loop's own (every one, each naming its field)."""
        problems = super().problems()

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def one_of(name: str, allowed) -> None:
            value = getattr(self, name)
            need(value in allowed, f"{name} must be one of {tuple(allowed)}, got {value!r}")

        counts = ("steps", "batch", "samples_per_prompt", "minibatch_size", "epochs", "max_new_tokens")
        for name in counts:
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        sizes_ok = all(isinstance(getattr(self, k), int) and getattr(self, k) >= 1 for k in counts)
        if sizes_ok:
            total = self.batch * self.samples_per_prompt
            need(
                total % self.minibatch_size == 0,
                f"batch × samples_per_prompt = {self.batch} × {self.samples_per_prompt} = {total} is not divisible "
                f"by minibatch_size = {self.minibatch_size}",
            )
        for name in ("lr", "kl_horizon"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.kl_target > 0, f"kl_target must be > 0 (a KL budget in nats per reply), got {self.kl_target}")
        for name in ("value_lr", "value_clip", "max_grad_norm", "early_stop_approx_kl"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be > 0 or None, got {value}")
        for name in ("weight_decay", "entropy_coef", "kl_coef", "missing_eos_penalty", "length_penalty", "vf_coef",
                     "checkpoint_every"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value >= 0, f"{name} must be >= 0, got {value}")
        one_of("loss_backend", BACKENDS)
        one_of("kl_placement", KL_PLACEMENTS)
        one_of("lr_schedule", LR_SCHEDULES)
        one_of("advantage_estimator", ADVANTAGE_ESTIMATORS)
        one_of("data_parallel", distributed.DATA_PARALLEL_MODES)
        need(self.monitor or not self.stop_on_alarm, "stop_on_alarm needs monitor=True (the monitor raises the alarms)")
        need(
            not (self.adaptive_kl and self.kl_coef == 0),
            "adaptive_kl needs kl_coef > 0: the controller multiplies β, so β = 0 stays 0",
        )
        if self.kl_coef_min is not None:
            need(self.adaptive_kl, "kl_coef_min bounds the adaptive β: set adaptive_kl=True or kl_coef_min=None")
            need(
                isinstance(self.kl_coef_min, (int, float)) and 0 <= self.kl_coef_min <= self.kl_coef,
                f"kl_coef_min must be in [0, kl_coef] = [0, {self.kl_coef}] (β starts at kl_coef), "
                f"got {self.kl_coef_min}",
            )
        need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        need(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        if self.advantage_estimator in ("grpo", "rloo") and isinstance(self.samples_per_prompt, int):
            need(
                self.samples_per_prompt >= 2,
                f"advantage_estimator {self.advantage_estimator!r} compares replies to the same prompt: "
                f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}",
            )
        return problems

    def loss_for_step(self, beta: float) -> LossOptions:
        """The loss options of this step's updates: β enters the loss only with kl_placement='loss'."""
        return self.loss_options(kl_coef=beta if self.kl_placement == "loss" else 0.0)


def validate(cfg: PPOConfig) -> None:
    """The checks that depend on the environment (torch.distributed); ``PPOConfig`` checks the rest."""
    if not isinstance(cfg, PPOConfig):
        raise ValueError(f"cfg must be a PPOConfig, got {type(cfg).__name__}")
    if distributed.resolve_data_parallel(cfg.data_parallel) is None:
        return
    problems: List[str] = []
    if not (dist.is_available() and dist.is_initialized()):
        problems.append(f"data_parallel={cfg.data_parallel!r} needs torch.distributed initialised (use torchrun)")
    else:
        world = dist.get_world_size()
        if cfg.batch * cfg.samples_per_prompt % world:
            problems.append(f"batch × samples_per_prompt = {cfg.batch * cfg.samples_per_prompt} replies must split "
                            f"evenly over {world} data-parallel ranks")
        if cfg.minibatch_size % world:
            problems.append(f"minibatch_size = {cfg.minibatch_size} must split evenly over {world} data-parallel ranks")
    if problems:
        raise ValueError("invalid PPOConfig:\n  - " + "\n  - ".join(problems))
