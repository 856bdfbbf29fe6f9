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
   atomic checkpoint;
8. the reward-hacking monitor (:mod:`rlhf_fast.monitor`, ``cfg.monitor``) reads the step's metrics and
   the KL per token id (from the rollout's log-probs, already computed): its warnings and alarms go
   to the progress display and ``metrics.jsonl``; ``cfg.stop_on_alarm`` ends the run at an alarm.

The KL target of the adaptive controller is the **per-sequence sum** of k1 to the
reference (mean over the step's replies); ``kl_ref_k1_sum`` in the metrics is that number.

Conventions: the policy runs in eval mode (dropout off) for rollout *and* update, so the
first minibatch's ratio is exactly 1. One process and data parallelism run the same code:
:mod:`.distributed` gives a :class:`~.distributed.SingleProcess` stand-in for one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..monitor import RewardHackingMonitor, token_kl_sums
from . import distributed
from .checkpoint import atomic_write_text, open_checkpoint
from .config import PPOConfig, validate
from .kl_control import AdaptiveKLController, FixedKLController
from .metrics import rollout_metrics
from .models import ValueHead, check_compatibility, lm_head
from .records import StepRecord
from .rollout import choose_prompts, collect_rollout, prompt_lists
from .seeding import seed_everything
from .update import ppo_update

_RESUMABLE_CHANGES = {"steps", "resume", "progress", "checkpoint_every", "out_dir", "data_parallel", "monitor",
                      "stop_on_alarm"}
"""PPOConfig fields a resumed run may change."""


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
    monitor: Optional[RewardHackingMonitor] = None,
) -> List[StepRecord]:
    """Run PPO for ``cfg.steps`` steps (continuing a checkpoint with ``cfg.resume``); the policy is updated in place.

    prompts: token-id lists, or ``(ids [N, L], mask [N, L])``. reward_model: a
    :class:`~rlhf_fast.RewardModel` (or any ``(input_ids, attention_mask) -> [B]``
    module; ``reward_normalize`` needs its ``normalize``). value_model: a separate critic
    with ``values(input_ids, attention_mask, position_ids) -> [B, L]`` (e.g. a copy of
    the reward model); without one, GAE puts a :class:`ValueHead` on the policy's hidden
    state. extra_metrics(prompt_ids, response_ids) receives unpadded token lists (replies
    include EOS) and its floats join each step's metrics. log_fn(record) is called after
    each step. Returns the records of all steps so far (resumed ones included).

    Data parallel (``cfg.data_parallel``, under torchrun; see :mod:`.distributed`): every
    rank calls ``train`` with the same arguments and models on its own device; each rank
    gets the same records, rank 0 writes ``metrics.jsonl`` and the progress bar, and
    checkpoints are ``torch.distributed.checkpoint`` directories (``out_dir/checkpoint``)
    that resume under any world size. extra_metrics runs on rank 0 over the global batch;
    log_fn runs on every rank.

    monitor: the :class:`~rlhf_fast.monitor.RewardHackingMonitor` to run (default, with ``cfg.monitor``:
    one set up from cfg, naming tokens with ``policy_tokenizer`` when given). It sees every step's
    metrics and the KL per reply carried by each token id; each record's ``alerts`` are what it raised
    at that step. It runs on every rank (the records are the same), so ``stop_on_alarm`` stops them all.
    """
    # --- checks: everything that can fail does so before any work ---
    validate(cfg)
    prompts = prompt_lists(prompts)
    if len(prompts) < cfg.batch:
        raise ValueError(f"batch = {cfg.batch} prompts per step, but only {len(prompts)} prompts were given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_compatibility(policy, ref_policy, reward_model, eos_token_id, pad_token_id,
                        policy_tokenizer, reward_tokenizer)
    if cfg.reward_normalize and not hasattr(reward_model, "normalize"):
        raise ValueError("reward_normalize=True needs a reward model with normalize() (see rf.calibrate)")
    if cfg.reward_normalize and not getattr(reward_model, "is_calibrated", True):
        raise ValueError("reward_normalize=True but the reward model is not calibrated: run rf.calibrate on "
                         "reference-policy samples first (or `python -m rlhf_fast calibrate`)")
    if monitor is not None and not cfg.monitor:
        raise ValueError("a monitor was given but cfg.monitor is False: set monitor=True in the PPOConfig")
    from tqdm.auto import tqdm

    # --- setup ---
    seed_everything(cfg.seed)
    for model in (policy, ref_policy, reward_model):
        model.eval()  # dropout off: the ratio of the first minibatch is exactly 1
    critic = None
    if cfg.advantage_estimator == "gae":
        critic = value_model if value_model is not None else ValueHead(lm_head(policy).weight.shape[1])
        critic.to(next(policy.parameters()).device).eval()
    dp = distributed.setup(policy, critic, cfg.data_parallel)  # before the optimizer (FSDP2 swaps parameters)
    param_groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
    if critic is not None:
        param_groups.append({"params": [p for p in critic.parameters() if p.requires_grad],
                             "lr": cfg.value_lr or cfg.lr})
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [group["lr"] for group in param_groups]
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, floor=cfg.kl_coef_min or 0.0)
              if cfg.adaptive_kl else FixedKLController(cfg.kl_coef))
    watcher = (monitor or default_monitor(cfg, policy_tokenizer)) if cfg.monitor else None

    # --- resume ---
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    checkpoint = open_checkpoint(cfg.out_dir, dp, optimizer, cfg.resume)
    records: List[StepRecord] = []
    start_step = 0
    if cfg.resume and checkpoint.exists():
        state = checkpoint.read()
        _check_same_config(state["config"], cfg)
        checkpoint.restore(state)
        kl_ctl.load_state_dict(state["kl_controller"])
        start_step = state["step"]
        records = [StepRecord(r["step"], r["metrics"], r.get("alerts", [])) for r in state["records"]]
        if watcher is not None:  # its state from the steps done (their alerts are in the records already)
            for r in records:
                watcher.update(r.metrics, step=r.step)
    # metrics.jsonl holds exactly the checkpointed steps (drops lines of steps lost in a crash)
    if dp.is_main:
        atomic_write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), metrics_path)

    bar = tqdm(total=cfg.steps, initial=start_step, desc="ppo", disable=not (cfg.progress and dp.is_main))
    for step in range(start_step, cfg.steps):
        started = time.perf_counter()
        beta = kl_ctl.value
        step_prompts = choose_prompts(prompts, cfg, step)
        dp.seed_step(cfg.seed, step)  # data parallel: each rank's sampling stream from (seed, step, rank)
        rollout = collect_rollout(cfg, dp, ref_policy, reward_model, step_prompts, beta, eos_token_id, pad_token_id)
        lr_factor = 1.0 - step / cfg.steps if cfg.lr_schedule == "linear" else 1.0  # from the step alone: resume-exact
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_factor
        update_metrics = ppo_update(cfg, dp, optimizer, rollout, beta, dp.minibatch_order(cfg.seed, step))

        # KL controller: the target is the KL per reply (k1 summed over tokens, mean over replies)
        metrics = rollout_metrics(rollout, cfg)
        kl_ctl.update(metrics["kl_ref_k1_sum"], len(step_prompts))
        metrics.update(update_metrics, kl_coef=beta, kl_coef_next=kl_ctl.value, lr=optimizer.param_groups[0]["lr"])
        if cfg.adaptive_kl:
            metrics["kl_target"] = cfg.kl_target
        from_main = {}  # computed by rank 0 alone, the same on every rank
        if extra_metrics is not None and dp.is_main:
            from_main.update({k: float(v) for k, v in extra_metrics(step_prompts, rollout.samples.replies()).items()})
        from_main["step_time_s"] = time.perf_counter() - started
        metrics.update(dp.broadcast(from_main))

        alerts = []
        if watcher is not None:
            samples = rollout.samples
            token_kl = token_kl_sums(rollout.old_logprobs, rollout.ref_logprobs, samples.response_ids,
                                     samples.response_mask)
            alerts = watcher.update(metrics, step=step + 1, token_kl=token_kl)

        # diagnostics: metrics.jsonl, progress bar, callback, checkpoint (atomic)
        record = StepRecord(step + 1, metrics, [a.to_dict() for a in alerts])
        records.append(record)
        if dp.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record.to_dict()) + "\n")
        bar.update(1)
        postfix = dict(score=f"{metrics['score_raw_mean']:.3f}", kl=f"{metrics['kl_ref_k1_sum']:.2f}",
                       beta=f"{beta:.3g}", len=f"{metrics['response_length_mean']:.1f}",
                       clip=f"{metrics['clipfrac']:.2f}")
        if watcher is not None and watcher.alerts:
            postfix["monitor"] = watcher.verdict
        bar.set_postfix(**postfix)
        if cfg.progress and dp.is_main:
            for alert in alerts:
                tqdm.write(f"monitor {alert.severity.upper()} {alert.message}")
        stop = cfg.stop_on_alarm and any(a.severity == "alarm" for a in alerts)
        if log_fn is not None:  # before the checkpoint: RNG it draws is captured, so resume stays exact
            log_fn(record)
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop):
            checkpoint.save(step + 1, {"config": dataclasses.asdict(cfg), "kl_controller": kl_ctl.state_dict(),
                                       "records": [{"step": r.step, "metrics": r.metrics, "alerts": r.alerts}
                                                   for r in records]})
        if stop:
            if cfg.progress and dp.is_main:
                tqdm.write(f"stopped after step {step + 1}: the monitor raised an alarm (stop_on_alarm)")
            break
    bar.close()
    return records


def _check_same_config(saved: Dict[str, Any], cfg: PPOConfig) -> None:
    current = dataclasses.asdict(cfg)
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"cannot resume: the config differs from the checkpoint's ({details})")


def default_monitor(cfg: PPOConfig, tokenizer=None) -> RewardHackingMonitor:
    """The monitor ``train`` runs by default: rlhf_fast's metric names, the run's KL placement and clip range,
    token names from the policy's tokenizer when given (else token ids)."""
    decode = None
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        decode = lambda token_id: tokenizer.decode([token_id])  # noqa: E731
    return RewardHackingMonitor(trainer="rlhf_fast", kl_penalty=cfg.kl_placement, clip_eps=cfg.clip_eps,
                                decode=decode)
