"""The case study end to end: world → reference policy → reward model → PPO runs → evaluation.

:func:`prepare` builds what every PPO run shares (the SFT reference, the calibrated
reward model, prompts); :func:`run_ppo` trains one policy from the reference and
evaluates it; :func:`run_case_study` does the whole thing and returns a
:class:`CaseStudyResult` that :mod:`.report` writes out.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import rlhf_fast as rf

from . import models, runner, world
from .config import CaseStudyConfig, check_fixes
from .metrics import (  # noqa: F401  (re-exported: the report and the tests read them here)
    EARLY_KL_FRACTION,
    EARLY_RATIO_FRACTION,
    FIRST_TOKEN_KEYS,
    LANDSCAPE,
    first_token_probe,
    kl_rise,
    labeller_bayes_accuracy,
    reward_landscape,
    smoothed,
    trajectory_stats,
)
from .runner import describe  # noqa: F401  (re-exported: the report reads it here)


@dataclass
class Prepared:
    """What every PPO run of one case study shares."""

    reference: torch.nn.Module
    reward_model: torch.nn.Module
    train_prompts: List[List[int]]
    eval_prompts: List[List[int]]
    eval_unsafe: List[List[int]]
    info: Dict[str, float]
    """SFT loss, RM held-out accuracy, RM score correlations, calibration mean/std, stage times."""
    landscape: List[Dict[str, float]] = field(default_factory=list)
    """What the reward model pays for typical replies (:func:`reward_landscape`)."""


@dataclass
class RunResult:
    name: str
    settings: Optional[rf.PPOConfig]
    """The run's PPO config (None for the reference)."""
    records: List[Dict[str, float]]
    """Per-step metrics of the loop (empty for the reference)."""
    summary: Dict[str, Optional[float]]
    """Final evaluation: proxy_reward, gold, kl, length, refusal_rate, salesy_share, ..."""
    policy: Optional[torch.nn.Module] = None
    """The trained policy (the reference itself for the reference run)."""


@dataclass
class CaseStudyResult:
    """Everything one seed produced (the policies are dropped when a result crosses processes)."""

    config: CaseStudyConfig
    fix: str
    info: Dict[str, float]
    reference: RunResult
    baseline: RunResult
    fixed: RunResult
    sweep: List[RunResult] = field(default_factory=list)
    ablations: List[RunResult] = field(default_factory=list)
    """Each candidate change of :data:`ABLATIONS` alone (``--ablations``)."""
    seconds: float = 0.0
    landscape: List[Dict[str, float]] = field(default_factory=list)
    """What the reward model pays for typical replies (:func:`reward_landscape`)."""

    def runs(self) -> List[RunResult]:
        return [self.baseline, self.fixed, *self.ablations, *self.sweep]

    def without_policies(self) -> CaseStudyResult:
        strip = lambda run: dataclasses.replace(run, policy=None)  # noqa: E731
        return dataclasses.replace(
            self, reference=strip(self.reference), baseline=strip(self.baseline), fixed=strip(self.fixed),
            sweep=[strip(r) for r in self.sweep], ablations=[strip(r) for r in self.ablations],
        )


@dataclass
class MultiSeedResult:
    """One :class:`CaseStudyResult` per seed, in the order of ``seeds``."""

    seeds: Tuple[int, ...]
    results: List[CaseStudyResult]
    seconds: float = 0.0
    """Wall-clock seconds of the whole command."""
    cpu_seconds: float = 0.0
    """CPU seconds of this process and its workers together (user + system)."""
    jobs: int = 1


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress)


def prepare(cfg: CaseStudyConfig, progress: bool = True) -> Prepared:
    """Fine-tune the reference, train and calibrate the reward model, draw prompts."""
    from rlhf_fast import RewardModel, calibrate, train_reward_model

    info: Dict[str, float] = {}
    rng = random.Random(cfg.seed)

    started = time.perf_counter()
    _seed(cfg.seed)
    reference = models.build_policy(cfg.model)
    demos = world.sft_dataset(cfg.sft.examples, cfg.scenario, rng)
    steps = cfg.sft.epochs * -(-len(demos) // cfg.sft.batch_size)
    with _bar(steps, "sft reference", progress) as bar:
        losses = models.supervised_finetune(reference, demos, cfg.sft, bar)
    info["sft_final_loss"] = sum(losses[-20:]) / len(losses[-20:])
    info["sft_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    _seed(cfg.seed + 1)
    pairs = world.preference_pairs(cfg.rm_pairs, cfg.scenario, cfg.gold, cfg.labellers, rng)
    chosen_ids, chosen_mask = models.pad_right([p.prompt + p.chosen for p in pairs])
    rejected_ids, rejected_mask = models.pad_right([p.prompt + p.rejected for p in pairs])
    reward_model = RewardModel(copy.deepcopy(reference))  # RM initialised from the SFT model, as usual
    training = dataclasses.replace(cfg.rm_training, seed=cfg.seed, progress=progress)
    for lr, epochs in ((training.lr, training.epochs), (training.lr / 5, cfg.rm_anneal_epochs)):
        if epochs == 0:
            continue
        fit = train_reward_model(  # same seed, same held-out split in both phases
            reward_model, chosen_ids, chosen_mask, rejected_ids, rejected_mask,
            dataclasses.replace(training, lr=lr, epochs=epochs),
            heldout_fraction=cfg.rm_heldout,
        )
    info["rm_heldout_accuracy"] = float(fit["heldout_accuracy"])
    info["rm_train_accuracy"] = float(fit["train_accuracy"])
    info["rm_bayes_accuracy"] = labeller_bayes_accuracy(cfg, pairs)
    info.update(models.probe_correlations(reward_model, cfg.gold, cfg.scenario, 2000, cfg.seed + 2))

    _seed(cfg.seed + 3)
    calib_prompts = world.sample_prompts(cfg.calibration_samples, rng, cfg.scenario.unsafe_fraction)
    with _bar(1, "calibrate rm", progress) as bar:
        replies = models.sample_replies(
            reference, calib_prompts, cfg.ppo.max_new_tokens, cfg.ppo.temperature
        )
        ids, mask = models.pad_right([p + r for p, r in zip(calib_prompts, replies, strict=True)])
        mean, std = calibrate(reward_model, ids, mask)
        bar.update(1)
    info["rm_calibration_mean"], info["rm_calibration_std"] = mean, std
    info["rm_seconds"] = time.perf_counter() - started
    for model in (reference, reward_model):
        model.eval()
        model.requires_grad_(False)

    prompt_rng = random.Random(cfg.seed + 4)
    train_prompts = world.sample_prompts(cfg.train_prompts, prompt_rng, cfg.scenario.unsafe_fraction)
    eval_prompts = world.sample_prompts(cfg.eval_prompts, prompt_rng, cfg.scenario.unsafe_fraction)
    eval_unsafe = world.sample_prompts(cfg.eval_unsafe_prompts, prompt_rng, 1.0)
    landscape = reward_landscape(cfg, reference, reward_model)
    return Prepared(reference, reward_model, train_prompts, eval_prompts, eval_unsafe, info, landscape)


def evaluate(cfg: CaseStudyConfig, prep: Prepared, policy) -> Dict[str, float]:
    """Final numbers of one policy on the fixed evaluation prompts (same sampling seed for all)."""
    stats = models.evaluate_policy(
        policy, prep.reference, prep.reward_model, prep.eval_prompts, cfg.gold,
        cfg.ppo.max_new_tokens, cfg.ppo.temperature, seed=cfg.seed + 5,
    )
    torch.manual_seed(cfg.seed + 6)
    unsafe_replies = models.sample_replies(policy, prep.eval_unsafe, cfg.ppo.max_new_tokens, cfg.ppo.temperature)
    unsafe = world.behaviour(prep.eval_unsafe, unsafe_replies, cfg.gold)
    n_mixed = sum(p[1] == world.UNSAFE for p in prep.eval_prompts)
    n_extra = len(prep.eval_unsafe)
    for key in ("refusal_rate", "comply_rate"):  # pool both UNSAFE sets
        stats[key] = (stats[key] * n_mixed + unsafe[key] * n_extra) / (n_mixed + n_extra)
    return stats


def step_metrics(cfg: CaseStudyConfig, policy=None, reference=None):
    """The ``extra_metrics`` hook: gold score and behaviour of each step's replies, and with
    ``policy`` and ``reference`` the first-token probe of the policy after the step's update."""

    def extra(prompts: List[List[int]], replies: List[List[int]]) -> Dict[str, float]:
        stats = world.behaviour(prompts, replies, cfg.gold)
        if policy is not None:
            stats.update(first_token_probe(policy, reference, cfg.ppo.temperature))
        return {k: v for k, v in stats.items() if v == v}  # drop NaN (a batch without UNSAFE prompts)

    return extra


def run_ppo(
    cfg: CaseStudyConfig, prep: Prepared, name: str, settings: rf.PPOConfig, out_dir: str, progress: bool = True
) -> RunResult:
    """PPO from a fresh copy of the reference with ``settings``, then :func:`evaluate`."""
    started = time.perf_counter()
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"PPO run '{name}': {describe(settings)}")
    policy = copy.deepcopy(prep.reference)
    policy.requires_grad_(True)
    records = runner.run_ppo(
        cfg.ppo, settings, seed=cfg.seed, policy=policy, reference=prep.reference,
        reward_model=prep.reward_model, prompts=prep.train_prompts,
        extra_metrics=step_metrics(cfg, policy, prep.reference), out_dir=out_dir, progress=progress,
    )
    summary = evaluate(cfg, prep, policy)
    summary.update(trajectory_stats(records))
    summary.update(
        kl_target=settings.kl_target if settings.adaptive_kl else None,
        kl_coef_final=records[-1]["kl_coef_next"] if records else None,
        seconds=time.perf_counter() - started,
    )
    return RunResult(name, settings, records, summary, policy)


def run_case_study(
    cfg: CaseStudyConfig,
    out_dir: str,
    fix: str = "adaptive-kl",
    sweep: bool = False,
    progress: bool = True,
    ablations: Sequence[str] = (),
) -> CaseStudyResult:
    """Reference, baseline and fix of one seed (plus ``ablations`` and the KL-target sweep), all
    from the same reference, reward model and seed; per-step metrics go to ``out_dir/<run>/``."""
    import os

    check_fixes((fix, *ablations))
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        prep = prepare(cfg, progress)
        reference = RunResult("reference", None, [], evaluate(cfg, prep, prep.reference), prep.reference)
        baseline = run_ppo(cfg, prep, "baseline", cfg.ppo, os.path.join(out_dir, "baseline"), progress)
        fixed = run_ppo(cfg, prep, "fix", cfg.fix_ppo(fix), os.path.join(out_dir, "fix"), progress)
        extra = [
            run_ppo(cfg, prep, name, cfg.fix_ppo(name), os.path.join(out_dir, name), progress)
            for name in ablations
            if name != fix
        ]
        runs = []
        if sweep:
            for target in cfg.sweep_targets:
                name = f"sweep_kl{target:g}"
                settings = cfg.fix_ppo("adaptive-kl", kl_target=target)
                runs.append(run_ppo(cfg, prep, name, settings, os.path.join(out_dir, name), progress))
    finally:
        torch.set_num_threads(threads)
    return CaseStudyResult(
        cfg, fix, prep.info, reference, baseline, fixed, runs, extra, seconds=time.perf_counter() - started,
        landscape=prep.landscape,
    )


def _seed_job(job) -> CaseStudyResult:
    """Worker of :func:`run_seeds`: one seed, end to end, in its own process (no progress bars)."""
    cfg, out_dir, fix, sweep, ablations = job
    return run_case_study(cfg, out_dir, fix, sweep, False, ablations).without_policies()


def default_jobs(n_seeds: int) -> int:
    """Seeds run side by side: one process per CPU this process may use, at most one per seed."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_seeds, cpus))


def run_seeds(
    cfg: CaseStudyConfig,
    seeds: Sequence[int],
    out_dir: str,
    fix: str = "adaptive-kl",
    sweep: bool = False,
    ablations: Sequence[str] = (),
    jobs: Optional[int] = None,
    progress: bool = True,
    on_result=None,
) -> MultiSeedResult:
    """:func:`run_case_study` for every seed (``cfg.seed`` is replaced), into ``out_dir/seed<N>``.

    Each seed is a pure function of (config, seed): it reseeds every stage and runs on
    ``cfg.threads`` threads, so its numbers do not depend on ``jobs`` or on the other seeds
    (``--seed 1`` reproduces seed 1 of the default run bit for bit). With ``jobs > 1`` the
    seeds run in that many worker processes. ``on_result(result)`` is called as each seed ends.
    """
    import os
    import resource

    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. seeds=(0, 1, 2)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be different from each other, got {seeds}")
    check_fixes((fix, *ablations))
    jobs = default_jobs(len(seeds)) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    jobs = min(jobs, len(seeds))
    started = time.perf_counter()
    cpu_started = _cpu_seconds(resource)
    work = [
        (dataclasses.replace(cfg, seed=seed), os.path.join(out_dir, f"seed{seed}"), fix, sweep, tuple(ablations))
        for seed in seeds
    ]
    results: Dict[int, CaseStudyResult] = {}
    if jobs == 1:
        for job in work:
            result = run_case_study(job[0], job[1], fix, sweep, progress, job[4]).without_policies()
            results[result.config.seed] = result
            if on_result is not None:
                on_result(result)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(_seed_job, job) for job in work]
            for future in as_completed(futures):
                result = future.result()
                results[result.config.seed] = result
                if on_result is not None:
                    on_result(result)
    return MultiSeedResult(
        seeds, [results[s] for s in seeds], seconds=time.perf_counter() - started,
        cpu_seconds=_cpu_seconds(resource) - cpu_started, jobs=jobs,
    )


def _cpu_seconds(resource) -> float:
    """User + system CPU seconds of this process and of its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total
