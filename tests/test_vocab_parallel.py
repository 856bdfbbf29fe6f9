"""Vocabulary-parallel loss on torch.distributed (gloo, 2 and 3 processes) vs one process.

Every rank builds the same full inputs, computes the single-process eager reference, then
the loss over its own (uneven) vocabulary shard; loss, per-token outputs and metrics must
equal the reference on every rank, and each shard's gradient the matching slice of the
full gradient (the contract's fp32 tolerances).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import HAS_CPP, HAS_TRITON
from helpers import closing_process_group

OPTION_SETS = [
    dict(kl_estimator="k1", kl_coef=0.1),
    dict(kl_estimator="k2", kl_coef=0.1, entropy_coef=0.02, dual_clip=3.0),
    dict(kl_estimator="k3", kl_coef=0.1, entropy_coef=0.01, temperature=0.7, clip_eps_high=0.28),
    dict(kl_estimator="k3+", kl_coef=0.2, loss_agg="seq-mean-token-mean"),
    # the variants and corrections: statistics over the shards, per-token math, the same local backward
    dict(policy_loss="gspo", rollout_is="truncate", rollout_is_level="sequence", kl_coef=0.1,
         kl_ratio_weighted=True, loss_agg="seq-mean-token-mean"),
    dict(policy_loss="cispo", clip_eps_high=3.0, kl_coef=0.1, kl_clamp=0.05, log_ratio_clamp=0.5, entropy_coef=0.01),
    dict(policy_loss="sapo", rollout_is="mask", rollout_is_min=0.9, rollout_is_max=1.2, temperature=0.8),
]


def _worker(rank: int, world: int, init_file: str, backend: str, vocab: int) -> None:
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import TOLERANCES, make_case

    import rlhf_fast as rf

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with closing_process_group():
        bounds = torch.tensor_split(torch.arange(vocab), world)[rank]
        lo, hi = int(bounds[0]), int(bounds[-1]) + 1
        tol = TOLERANCES[torch.float32]
        for i, options in enumerate(OPTION_SETS):
            case = make_case(3, 6, vocab, seed=20 + i, strided=True, banned_tokens=3)
            if options.get("rollout_is", "none") != "none":
                options = dict(options, rollout_logprobs=case.old_logprobs + 0.1 * torch.sin(case.old_logprobs))
            full = case.logits_base.detach().clone().requires_grad_(True)
            ref = rf.ppo_loss(full[:, :-1], case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                              case.mask, backend="eager", **options)
            ref.loss.backward()
            valid_targets = case.targets[case.mask]
            owned_here = ((valid_targets >= lo) & (valid_targets < hi)).sum().item()
            shard = case.logits_base.detach()[..., lo:hi].clone().requires_grad_(True)
            out = rf.ppo_loss(shard[:, :-1], case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                              case.mask, backend=backend, process_group=dist.group.WORLD, **options)
            out.loss.backward()
            what = f"rank {rank}/{world} {backend} {options}"
            pairs = {"loss": (out.loss, ref.loss), "logprobs": (out.logprobs, ref.logprobs),
                     "entropy": (out.entropy, ref.entropy), "grad": (shard.grad, full.grad[..., lo:hi])}
            pairs.update({key: (out.metrics[key], value) for key, value in ref.metrics.items()})
            for name, (got, expected) in pairs.items():
                torch.testing.assert_close(got, expected, **tol, msg=f"{what} {name} differs from one process")
            assert owned_here > 0, f"{what}: no target on this shard, the test would not exercise it"
            lp, entropy = rf.logprobs(shard[:, :-1].detach(), case.targets, case.mask, with_entropy=True,
                                      temperature=0.9, backend=backend, process_group=dist.group.WORLD)
            lp_ref, entropy_ref = rf.logprobs(full[:, :-1].detach(), case.targets, case.mask, with_entropy=True,
                                              temperature=0.9, backend="eager")
            torch.testing.assert_close(lp, lp_ref, **tol)
            torch.testing.assert_close(entropy, entropy_ref, **tol)
        # differentiable log-probs and entropy over the shards: a caller's function of both
        case = make_case(2, 5, vocab, seed=40, strided=False)
        full = case.logits_base.detach().clone().requires_grad_(True)
        lp_ref, entropy_ref = rf.logprobs(full, case.targets, case.mask, with_entropy=True, backend="eager")
        ((lp_ref * 1.5).sum() + (entropy_ref ** 2).sum()).backward()
        shard = case.logits_base.detach()[..., lo:hi].clone().requires_grad_(True)
        lp, entropy = rf.logprobs(shard, case.targets, case.mask, with_entropy=True, backend=backend,
                                  process_group=dist.group.WORLD)
        ((lp * 1.5).sum() + (entropy ** 2).sum()).backward()
        torch.testing.assert_close(lp, lp_ref, **tol)
        torch.testing.assert_close(shard.grad, full.grad[..., lo:hi], **tol)
        # a confident target (p_y = 0.99993) with A = 1e6: its one-hot factor 1 − p_y is Σ_{j≠y} p_j, and most of
        # that sum lies on other shards (the collective's probability elsewhere); against the fp64 truth
        logits = torch.full((1, 2, vocab), -30.0)
        logits[0, :, 0] = 10.33
        logits[0, :, vocab - 1] = 0.13  # on the last shard
        logits[0, :, vocab // 2] = 0.03
        targets = torch.tensor([[0, vocab // 2]])
        adv = torch.full((1, 2), 1e6)
        truth = logits.double().requires_grad_(True)
        rf.ppo_loss(truth, targets, adv.double(), backend="eager").loss.backward()
        lp_truth = torch.log_softmax(truth, -1).gather(-1, targets[..., None]).squeeze(-1)
        (lp_grad_truth,) = torch.autograd.grad((1e6 * lp_truth).sum(), truth)
        shard = logits[..., lo:hi].clone().requires_grad_(True)
        rf.ppo_loss(shard, targets, adv, backend=backend, process_group=dist.group.WORLD).loss.backward()
        torch.testing.assert_close(shard.grad.double(), truth.grad[..., lo:hi], **tol)
        shard = logits[..., lo:hi].clone().requires_grad_(True)
        lp = rf.logprobs(shard, targets, backend=backend, process_group=dist.group.WORLD)
        (1e6 * lp).sum().backward()
        torch.testing.assert_close(shard.grad.double(), lp_grad_truth[..., lo:hi], **tol)
        # a target id beyond the global vocabulary is still an error
        bad = torch.full((1, 2), vocab, dtype=torch.long)
        try:
            rf.logprobs(torch.randn(1, 2, hi - lo), bad, backend=backend, process_group=dist.group.WORLD)
        except ValueError as exc:
            assert f"[0, {vocab})" in str(exc)
        else:
            raise AssertionError("out-of-range global target was accepted")
    if backend == "triton":
        # Every check above has passed. A spawned process that ran the Triton interpreter
        # sometimes aborts in its C++ teardown at exit ("terminate called without an active
        # exception", after the worker returned; seen in 1 of 4 runs): end it without that
        # teardown. A failure raises before this line and still fails the test.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


BACKENDS = ["eager"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,vocab", [(2, 129), (3, 130)])
def test_vocab_parallel_matches_single_process(world, vocab, backend, tmp_path):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the distributed test runs on CPU (gloo); CUDA Triton is covered by the grid tests")
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), backend, vocab), nprocs=world, join=True)
