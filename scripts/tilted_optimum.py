"""What the case study's fix is optimising toward: the KL-regularised optimum of each seed's reward model.

For each seed this builds the reference and the reward model exactly as the case study does (same
seed, same numbers), then estimates π*_β ∝ π_ref·exp(r/β), the policy that maximises
E[r] − β·KL(π‖π_ref), at several β (rlhf_fast.casestudy.metrics.tilted_optimum): its KL to the
reference (nats per reply) and its refusal rate on UNSAFE prompts. The β at which π* spends the
fix's budget is interpolated from the table. A PPO run is not π* (it is short and rarely samples
what the reference rarely says), but π* is where a run drifts whenever it does sample it.

    python scripts/tilted_optimum.py --seeds 3,8
    python scripts/tilted_optimum.py --seeds 0-9 --betas 0.3,0.5,0.7
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

from rlhf_fast.casestudy.cli import parse_seeds
from rlhf_fast.casestudy.config import CaseStudyConfig, quick_config
from rlhf_fast.casestudy.metrics import tilted_optimum
from rlhf_fast.casestudy.pipeline import prepare

DEFAULT_BETAS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)


def at_budget(rows, budget: float):
    """(β, refusal rate) where π*'s KL crosses ``budget``, interpolated in log β; None outside the table."""
    rows = sorted(rows, key=lambda r: r["beta"])
    for low, high in zip(rows, rows[1:]):
        if low["kl"] >= budget >= high["kl"]:
            t = 0.0 if low["kl"] == high["kl"] else (low["kl"] - budget) / (low["kl"] - high["kl"])
            beta = math.exp((1 - t) * math.log(low["beta"]) + t * math.log(high["beta"]))
            return beta, (1 - t) * low["refusal_rate"] + t * high["refusal_rate"]
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 3,8 or 0-9 (as for the casestudy command)")
    parser.add_argument("--betas", default=",".join(map(str, DEFAULT_BETAS)), help="comma-separated β > 0")
    parser.add_argument("--samples", type=int, default=64, help="reference continuations per first token")
    parser.add_argument("--quick", action="store_true", help="the smoke-test world of casestudy --quick")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        betas = [float(b) for b in args.betas.split(",") if b.strip()]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not betas or min(betas) <= 0 or args.samples < 1:
        print("error: --betas must list numbers > 0 and --samples must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for seed in seeds:
        cfg = dataclasses.replace(quick_config() if args.quick else CaseStudyConfig(), seed=seed)
        prep = prepare(cfg, progress=False)
        rows = tilted_optimum(cfg, prep.reference, prep.reward_model, betas, samples=args.samples, seed=seed)
        print(f"seed {seed}: reference refusal rate {rows[0]['refusal_reference']:.1%} (from the same samples)")
        print("     β   KL(π*) nats/reply  (UNSAFE, safe)   refusal rate of π*")
        for row in rows:
            print(f"  {row['beta']:5.2f}   {row['kl']:8.2f}          ({row['kl_unsafe']:.2f}, {row['kl_safe']:.2f})"
                  f"      {row['refusal_rate']:6.1%}")
        crossing = at_budget(rows, cfg.fix_kl_target)
        if crossing:
            print(f"  π* spends the budget of {cfg.fix_kl_target:g} nats at β ≈ {crossing[0]:.2f}, "
                  f"refusing {crossing[1]:.1%}")
        else:
            print(f"  π*'s KL does not cross the budget of {cfg.fix_kl_target:g} nats within these β")
    return 0


if __name__ == "__main__":
    sys.exit(main())
