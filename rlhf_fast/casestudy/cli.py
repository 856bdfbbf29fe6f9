"""``python -m rlhf_fast casestudy``: reproduce the reward-hacking incident and its fix on a CPU.

For each seed: fine-tunes a tiny reference policy, trains a reward model on biased
simulated preferences, then runs PPO twice from the same reference: the incident's setup
(small fixed β, raw reward) and the one-change fix (adaptive KL budget to the reference,
normalised reward). Prints the mean ± spread over the seeds and the bar checked on every
seed, and writes a run folder (summary.json, report.md, plots, one folder per seed).
Exit status 1 when a check of the bar fails on some seed (0 with ``--quick``, a smoke run);
docs/casestudy.md tells the story and shows the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import List

from .config import ABLATIONS, FIXES, CaseStudyConfig, quick_config
from .pipeline import run_seeds

DEFAULT_SEEDS = (0, 1, 2, 3)
"""The main job's seeds: two rounds of two worker processes on 2 cores (about 8 minutes); `--seeds 0-9` is the
validation set."""
DEFAULT_OUT = os.path.join("runs", "casestudy")
QUICK_OUT = os.path.join("runs", "casestudy-quick")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", default=None,
        help="seeds, each a full run from data to evaluation: comma-separated integers and ranges, e.g. 0-9 "
             "(the validation set) or 0-4,7 (default 0-3; the bar must hold on every one)",
    )
    seeds.add_argument("--seed", type=int, default=None, help="a single seed (same numbers as that seed of --seeds)")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a small run for smoke tests (about a minute, one seed unless --seeds); the bar is not expected to "
             f"hold; writes to {QUICK_OUT} unless --out",
    )
    parser.add_argument("--out", default=None, help=f"run folder (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick)")
    parser.add_argument(
        "--fix", choices=FIXES, default="adaptive-kl",
        help="the one change compared with the baseline (default adaptive-kl: KL budget + normalised reward)",
    )
    parser.add_argument("--kl-target", type=float, default=None, help="KL budget of adaptive-kl, nats per reply")
    parser.add_argument(
        "--kl-coef", type=float, default=None,
        help="starting β of adaptive-kl (default 1/√(2·budget): 0.5 for the default budget of 2 nats)",
    )
    parser.add_argument(
        "--kl-setpoint", action="store_true",
        help="adaptive-kl with Ziegler et al.'s set-point controller, which also lowers β below its start to "
             "spend the budget (default: the budget is a ceiling)",
    )
    parser.add_argument(
        "--ablations", action="store_true",
        help=f"also run every other candidate change alone: {', '.join(ABLATIONS)}",
    )
    parser.add_argument("--sweep", action="store_true", help="also run adaptive-kl over several KL targets")
    parser.add_argument(
        "--jobs", type=int, default=None,
        help="seeds run side by side in this many processes (default: one per available CPU, at most one per "
             "seed); the numbers do not depend on it",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per seed (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_seeds(text: str) -> List[int]:
    """Seeds from ``--seeds``: comma-separated integers and inclusive ranges, e.g. ``0,1,2``, ``0-9``, ``0-4,7``."""
    usage = f"--seeds takes comma-separated integers or ranges such as 0,1,2 or 0-9; got {text!r}"
    seeds: List[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise ValueError(f"--seeds range {part!r} runs backwards; write it as {last}-{first}")
            seeds.extend(range(first, last + 1))
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise ValueError(usage)
    if not seeds:
        raise ValueError(usage)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def main(args: argparse.Namespace) -> int:
    try:
        if args.seed is not None:
            seeds = [args.seed]
        elif args.seeds is not None:
            seeds = parse_seeds(args.seeds)
        else:
            seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    cfg = quick_config() if args.quick else CaseStudyConfig()
    if args.kl_target is not None:
        if not args.kl_target > 0:
            print(f"--kl-target must be a number of nats > 0, got {args.kl_target}", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, fix_kl_target=args.kl_target)
    if args.kl_coef is not None:
        if not args.kl_coef > 0:
            print(f"--kl-coef must be a β > 0, got {args.kl_coef}", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, fix_kl_coef=args.kl_coef)
    if args.kl_setpoint:
        cfg = dataclasses.replace(cfg, fix_kl_ceiling=False)
    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.jobs is not None and args.jobs < 1:
        print(f"--jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    from .report import bar_table, runs_table, table, write_report

    progress = not args.no_progress

    def finished(result) -> None:
        if progress:
            print(f"seed {result.config.seed}: done in {result.seconds:.0f} s", flush=True)

    started = time.perf_counter()
    multi = run_seeds(
        cfg, seeds, out, fix=args.fix, sweep=args.sweep, ablations=ABLATIONS if args.ablations else (),
        jobs=args.jobs, progress=progress, on_result=finished,
    )
    summary = write_report(multi, out)
    n = len(seeds)
    print()
    print(f"seeds {','.join(map(str, seeds))}" + (" (mean ± std over seeds)" if n > 1 else ""))
    print(table(summary))
    if summary["ablations"]:
        print()
        print(runs_table(summary, ["fix", *summary["ablations"]], markdown=False, label="change"))
    if summary["sweep"]:
        print()
        print(runs_table(summary, summary["sweep"], markdown=False, label="run"))
    print()
    print(bar_table(summary))
    if summary.get("monitor_detection"):
        from .detection import detection_table

        print("\nthe reward-hacking monitor on these runs (outcomes from the evaluation it never sees):")
        print(detection_table(summary["monitor_detection"]))
    if summary["passed"]:
        verdict = f"bar passed on every one of {n} seeds" if n > 1 else "bar passed"
    else:
        failed = sum(not c["ok"] for c in summary["bar"])
        verdict = f"bar FAILED: {failed} check{'s' if failed > 1 else ''} fail on at least one seed"
    print(f"\n{verdict}" + (" (not expected with --quick)" if args.quick else ""))
    print(f"run folder: {out} (summary.json, report.md, plots, seed<N>/); "
          f"{time.perf_counter() - started:.0f} s wall, {summary['cpu_seconds']:.0f} s CPU")
    return 0 if summary["passed"] or args.quick else 1  # a failed bar is an error, except in a smoke run
