"""The reward-hacking monitor's detection table over the case study's runs, in one command.

    python benchmarks/monitor_detection.py --seeds 0,1,2,3,4,5,6,7,8,9 --ablations --out runs/monitor-detection

Runs the case study (``python -m rlhf_fast casestudy``) for each seed whose folder under ``--out``
lacks a run, reusing the folders that are there, then analyses every PPO run with the monitor
(as ``python -m rlhf_fast monitor`` does) against the outcome the monitor never sees, and prints
the detection table, a line per kind of run and the per-run table in markdown (docs/monitor.md
shows them). Also writes
``<out>/monitor_detection.json`` and, with ``--figure``, one hacked and one healthy run's signals
with their alerts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List

from rlhf_fast.casestudy import detection
from rlhf_fast.casestudy.cli import parse_seeds
from rlhf_fast.casestudy.config import ABLATIONS


def missing_seeds(out: str, seeds: List[int], ablations: bool) -> List[int]:
    """Seeds whose folder lacks the summary or a run's metrics."""
    runs = ["baseline", "fix", *(ABLATIONS if ablations else ())]
    missing = []
    for seed in seeds:
        folder = os.path.join(out, f"seed{seed}")
        summary = os.path.join(folder, "summary.json")
        done = os.path.isfile(summary) and all(os.path.isfile(os.path.join(folder, r, "metrics.jsonl")) for r in runs)
        if done and ablations:
            with open(summary) as f:
                done = set(ABLATIONS) <= set(json.load(f).get("ablations", {}))
        if not done:
            missing.append(seed)
    return missing


def figure(rows, out: str, path: str) -> None:
    """One hacked and one healthy run of the same seed (the lowest seed that has both), signals and alerts."""
    from rlhf_fast.monitor import analyse, load
    from rlhf_fast.monitor.plot import plot_runs

    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["run"]] = r
    for seed in sorted(by_seed):
        base, fix = by_seed[seed].get("baseline"), by_seed[seed].get("fix")
        if base and fix and base["label"] == "hacked" and fix["label"] == "healthy":
            runs = []
            for r in (base, fix):
                run = load(os.path.join(out, f"seed{seed}", r["run"]))
                title = f"seed {seed} {r['run']} ({r['label']})"
                runs.append((run, analyse(run), title))
            plot_runs(runs, path, extra=("gold per step (evaluation only:\nthe monitor never reads it)", "gold"))
            print(f"figure: {path} (seed {seed}: baseline hacked, fix healthy)")
            return
    print("figure: no seed with a hacked baseline and a healthy fix; none written")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated seeds (default 0-9)")
    parser.add_argument("--ablations", action="store_true", help="also every other candidate change alone")
    parser.add_argument("--out", default=os.path.join("runs", "monitor-detection"), help="case-study run folder")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes of the case study")
    parser.add_argument("--figure", default=None, help="write the hacked/healthy figure here (PNG)")
    parser.add_argument("--no-run", action="store_true", help="only analyse the folders that exist")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    todo = [] if args.no_run else missing_seeds(args.out, seeds, args.ablations)
    if todo:
        command = [sys.executable, "-m", "rlhf_fast", "casestudy", "--seeds", ",".join(map(str, todo)),
                   "--out", args.out, "--no-progress"]
        if args.ablations:
            command.append("--ablations")
        if args.jobs:
            command += ["--jobs", str(args.jobs)]
        print("running:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=False)  # exit 1 means a check of the case study's bar failed: still analysed
    rows = detection.detection_rows(args.out, seeds)
    if not rows:
        print(f"error: no case-study runs with a summary under {args.out}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "monitor_detection.json"), "w") as f:
        json.dump(detection.clean(rows), f, indent=2)
    print(f"\nseeds {','.join(str(s) for s in sorted({r['seed'] for r in rows}))}: {len(rows)} PPO runs\n")
    print(detection.detection_table(rows))
    print()
    print(detection.changes_table(rows))
    print()
    print(detection.runs_table(rows))
    if args.figure:
        figure(rows, args.out, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
