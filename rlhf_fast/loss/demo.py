"""``python -m rlhf_fast.loss.demo``: the fused loss on random data, checked against the reference.

Prints the metrics of one PPO loss call for every backend available on this
machine, and each backend's largest deviation from the eager reference.
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import backends
from .functional import ppo_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="number of tokens N (as B=8 sequences)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def main(args: argparse.Namespace) -> int:
    if args.tokens < 8 or args.vocab < 2:
        raise SystemExit("demo: --tokens must be ≥ 8 and --vocab ≥ 2")

    gen = torch.Generator().manual_seed(args.seed)
    batch, seq = 8, args.tokens // 8
    logits = torch.randn(batch, seq, args.vocab, generator=gen)
    targets = torch.randint(0, args.vocab, (batch, seq), generator=gen)
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.3 * torch.randn(lp.shape, generator=gen)  # a policy that moved a little
    ref = lp + 0.5 * torch.randn(lp.shape, generator=gen)
    advantages = torch.randn(batch, generator=gen)  # one per sequence
    mask = torch.rand(batch, seq, generator=gen) > 0.1
    options = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_eps_high=0.28, dual_clip=3.0)

    names = ["eager"] + [n for n in ("cpp", "triton") if _runs(n, logits)]
    print(f"PPO loss on N={batch * seq} tokens, V={args.vocab}: {options}")
    results = {}
    for name in names:
        x = logits.clone().requires_grad_(True)
        start = time.perf_counter()
        out = ppo_loss(x, targets, advantages, old, ref, mask, backend=name, **options)
        out.loss.backward()
        results[name] = (out, x.grad, time.perf_counter() - start)

    out, _, _ = results["eager"]
    print(f"\n{'metric':<16}{'value':>12}")
    print(f"{'loss':<16}{out.loss.item():>12.5f}")
    for key, value in out.metrics.items():
        print(f"{key:<16}{value.item():>12.5f}")
    print(f"\n{'backend':<10}{'fwd+bwd s':>10}{'max |Δloss|':>14}{'max |Δgrad|':>14}")
    ref_out, ref_grad, _ = results["eager"]
    for name, (o, g, seconds) in results.items():
        dl = (o.loss - ref_out.loss).abs().item()
        dg = (g - ref_grad).abs().max().item()
        print(f"{name:<10}{seconds:>10.3f}{dl:>14.2e}{dg:>14.2e}")
    if "cpp" not in results:
        print(f"\n(cpp backend unavailable: {backends.load_ops('cpp')[1]})")
    return 0


def _runs(name: str, logits: torch.Tensor) -> bool:
    try:
        return backends.resolve(name, logits) == name
    except (RuntimeError, ValueError):
        return False


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m rlhf_fast.loss.demo", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
