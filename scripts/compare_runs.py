"""Per-step metrics of the fix in two case-study run folders, seed by seed, on one figure.

Reads ``<folder>/seed<N>/fix/metrics.jsonl`` (what ``python -m rlhf_fast casestudy`` writes) and
draws one row per seed and one column per metric, each folder in its own colour. Used for the
case study's before/after figure:

    python -m rlhf_fast casestudy --seeds 3,7,8 --kl-coef 0.15 --kl-setpoint --out runs/before
    python -m rlhf_fast casestudy --seeds 0-9 --out runs/validation
    python scripts/compare_runs.py runs/before runs/validation --labels before,after --seeds 3,7,8 \\
        --out docs/figures/before_after.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

DEFAULT_KEYS = ("first_refuse_unsafe", "first_kl_unsafe", "kl_ref_k1_sum", "kl_coef")
LABELS = {
    "first_refuse_unsafe": "π(REFUSE first), UNSAFE prompts",
    "first_comply_unsafe": "π(complying first), UNSAFE prompts",
    "first_kl_unsafe": "first-token KL, UNSAFE prompts (nats)",
    "first_kl_safe": "first-token KL, safe prompts (nats)",
    "kl_ref_k1_sum": "KL to reference (nats/reply)",
    "kl_coef": "β",
    "refusal_rate": "refusal rate of the step's replies",
}


def read_steps(folder: str, seed: int, run: str = "fix") -> List[Dict[str, float]]:
    path = os.path.join(folder, f"seed{seed}", run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run the case study with --seeds {seed} --out {folder}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(folders: Sequence[str], labels: Sequence[str], seeds: Sequence[int], keys: Sequence[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ("tab:red", "tab:green", "tab:blue", "tab:orange")
    fig, axes = plt.subplots(len(seeds), len(keys), figsize=(3.2 * len(keys), 2.3 * len(seeds)), squeeze=False)
    for row, seed in enumerate(seeds):
        for folder, label, colour in zip(folders, labels, colours):
            steps = read_steps(folder, seed)
            for col, key in enumerate(keys):
                points = [(r["step"], r[key]) for r in steps if key in r]
                if points:
                    axes[row][col].plot(*zip(*points), color=colour, linewidth=1, label=label)
        for col, key in enumerate(keys):
            ax = axes[row][col]
            ax.set_title(f"seed {seed}: {LABELS.get(key, key)}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
            if row == len(seeds) - 1:
                ax.set_xlabel("PPO step", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="case-study run folders (up to 4)")
    parser.add_argument("--labels", default=None, help="comma-separated, one per folder (default: the folders)")
    parser.add_argument("--seeds", required=True, help="seeds to draw, e.g. 3,7,8")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="per-step metrics, comma-separated")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    from rlhf_fast.casestudy.cli import parse_seeds

    labels = args.labels.split(",") if args.labels else list(args.folders)
    problems = []
    if len(args.folders) > 4:
        problems.append(f"at most 4 folders, got {len(args.folders)}")
    if len(labels) != len(args.folders):
        problems.append(f"--labels names {len(labels)} folders, but {len(args.folders)} were given")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as error:
        problems.append(str(error))
        seeds = []
    keys = [k for k in args.keys.split(",") if k.strip()]
    if problems or not keys:
        print("error: " + "; ".join(problems or ["--keys names no metric"]), file=sys.stderr)
        return 2
    try:
        plot(args.folders, labels, seeds, keys, args.out)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
