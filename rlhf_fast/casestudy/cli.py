"""``python -m rlhf_fast casestudy``: reproduce the reward-hacking incident and its fix on a CPU.

Fine-tunes a tiny reference policy, trains a reward model on biased simulated
preferences, then runs PPO twice from the same reference and seed: the incident's
setup (small fixed β, raw reward) and the one-change fix (adaptive KL budget to the
reference, normalised reward). Prints a side-by-side table and writes a run folder
(summary.json, report.md, metrics.jsonl per run, plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from .pipeline import FIXES, CaseStudyConfig, quick_config, run_case_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests (< 2 min); bar not expected")
    parser.add_argument("--out", default=os.path.join("runs", "casestudy"), help="run folder (default runs/casestudy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0, the calibrated one)")
    parser.add_argument(
        "--fix", choices=FIXES, default="adaptive-kl",
        help="the one change compared with the baseline (default adaptive-kl: KL budget + normalised reward)",
    )
    parser.add_argument("--kl-target", type=float, default=None, help="KL budget of adaptive-kl, nats per reply")
    parser.add_argument("--sweep", action="store_true", help="also run adaptive-kl over several KL targets")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1, for reproducibility)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    cfg = quick_config(args.seed) if args.quick else CaseStudyConfig(seed=args.seed)
    if args.kl_target is not None:
        if args.kl_target <= 0:
            print("--kl-target must be > 0", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, fix_kl_target=args.kl_target)
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    from .report import bar_checks, table, write_report

    started = time.perf_counter()
    result = run_case_study(cfg, args.out, fix=args.fix, sweep=args.sweep, progress=not args.no_progress)
    summary = write_report(result, args.out)
    print()
    print(table(summary))
    print()
    for check in bar_checks(summary, result.baseline.records):
        print(f"  [{'ok' if check.ok else '--'}] {check.item}: {check.detail}")
    print(f"\nrun folder: {args.out} (report.md, summary.json, plots); {time.perf_counter() - started:.0f} s")
    return 0

