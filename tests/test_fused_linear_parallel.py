"""Vocabulary-parallel fused-linear loss on torch.distributed (gloo, 2 and 3 processes) vs one process.

Every rank builds the same full inputs (hidden ``[B, T, H]``, LM head ``[V, H]``, bias ``[V]``),
computes the single-process truth, ``rf.ppo_loss(hidden @ W.T + b, backend="eager")``
differentiated by autograd, then ``rf.fused_linear_ppo_loss`` over its own (uneven) row shard
of W and b. Loss, per-token outputs and metrics must equal the truth on every rank; d(hidden)
is the full gradient on every rank and d(W_rank), d(b_rank) the matching slices
(the contract's fp32 tolerances).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import HAS_CPP
from helpers import closing_process_group

# Every estimator, the entropy bonus, dual clip, clip-higher, τ and every aggregation.
OPTION_SETS = [
    dict(kl_estimator="k1", kl_coef=0.1, entropy_coef=0.02),
    dict(kl_estimator="k2", kl_coef=0.1, entropy_coef=0.02, dual_clip=3.0, loss_agg="seq-mean-token-sum"),
    dict(kl_estimator="k3", kl_coef=0.1, entropy_coef=0.01, temperature=0.7, clip_eps_high=0.28,
         global_num_tokens=40),
    dict(kl_estimator="k3+", kl_coef=0.2, loss_agg="seq-mean-token-mean"),
    dict(kl_estimator="k3", kl_coef=0.05, entropy_coef=0.03, loss_agg="seq-mean-token-sum-norm"),
    # variants and corrections: a statistics pass, then the backward recomputes each chunk's logits
    dict(policy_loss="gspo", rollout_is="truncate", rollout_is_level="sequence", kl_coef=0.1,
         loss_agg="seq-mean-token-mean"),
    dict(policy_loss="sapo", kl_coef=0.1, kl_clamp=0.05, kl_ratio_weighted=True, entropy_coef=0.01),
]


def _make_inputs(batch: int, seq: int, hidden_size: int, vocab: int, seed: int, per_sequence: bool):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (1.5 / hidden_size**0.5)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    banned = [v for v in torch.randperm(vocab, generator=gen).tolist() if not (targets == v).any()][:3]
    bias[banned] = float("-inf")  # banned tokens (−inf logits), never a target
    lp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.4 * torch.randn(lp.shape, generator=gen)
    ref = lp + 0.4 * torch.randn(lp.shape, generator=gen)
    advantages = torch.randn((batch,) if per_sequence else (batch, seq), generator=gen)
    mask = torch.rand(batch, seq, generator=gen) > 0.25
    mask[0] = False  # a fully masked row
    mask[1, 0] = True
    targets = torch.where(mask, targets, torch.full_like(targets, -100))  # padding ids
    return hidden, weight, bias, targets, advantages, old, ref, mask


def _check_bf16(rank: int, world: int, lo: int, hi: int, vocab: int, backend: str) -> None:
    """bf16 (the contract's double baseline): the sharded loss's error against fp64 truth is at most 2× the
    eager reference's own bf16 error; d(hidden) is summed over ranks in fp32 and rounded once."""
    from helpers import DOUBLE_BASELINE_ATOL, DOUBLE_BASELINE_FACTOR, max_error

    import rlhf_fast as rf

    hidden, weight, bias, targets, adv, old, ref_lp, mask = _make_inputs(4, 40, 32, vocab, 7, False)
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.8)

    def run(dtype, w, b, **extra):
        h = hidden.to(dtype).requires_grad_(True)
        w, b = w.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
        if extra:  # sharded fused-linear
            out = rf.fused_linear_ppo_loss(h, w, targets, adv, old, ref_lp, mask, bias=b, chunk_size=64, **extra,
                                           **options)
        else:  # eager on the materialised logits
            out = rf.ppo_loss(h @ w.T + b, targets, adv, old, ref_lp, mask, backend="eager", **options)
        out.loss.backward()
        return {"loss": out.loss, "logprobs": out.logprobs, "grad hidden": h.grad, "grad weight": w.grad}

    truth = run(torch.float64, weight, bias)
    eager = run(torch.bfloat16, weight, bias)
    sharded = run(torch.bfloat16, weight[lo:hi], bias[lo:hi], backend=backend, process_group=dist.group.WORLD)
    for name in ("grad weight",):  # compare this rank's rows only
        truth[name], eager[name] = truth[name][lo:hi], eager[name][lo:hi]
    for name, exact in truth.items():
        err, bound = max_error(sharded[name], exact), DOUBLE_BASELINE_FACTOR * max_error(eager[name], exact)
        what = f"rank {rank}/{world} {backend} bf16 {name}"
        assert err <= bound + DOUBLE_BASELINE_ATOL, f"{what}: error {err:.3g} > bound {bound:.3g}"


def _worker(rank: int, world: int, init_file: str, backend: str, vocab: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import DOUBLE_BASELINE_ATOL, DOUBLE_BASELINE_FACTOR, TOLERANCES, max_error

    import rlhf_fast as rf

    # One intra-op thread per rank: with two (3 ranks on 2 cores), the kl metric of one
    # case differed from the one-process run by up to 0.3% relative in about 1 run of 5;
    # the cause is not found yet (see the issue notes). One thread made 8 of 8 runs agree.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    with closing_process_group():
        bounds = torch.tensor_split(torch.arange(vocab), world)[rank]
        lo, hi = int(bounds[0]), int(bounds[-1]) + 1
        tol = TOLERANCES[torch.float32]
        for i, options in enumerate(OPTION_SETS):
            with_bias = i != 2
            hidden, weight, bias, targets, adv, old, ref_lp, mask = _make_inputs(
                3, 9, 16, vocab, seed=30 + i, per_sequence=i == 1)
            if not with_bias:
                bias = None
            if options.get("rollout_is", "none") != "none":
                options = dict(options, rollout_logprobs=old + 0.05 * torch.cos(old))
            # single-process truth: eager loss on the materialised logits, autograd to hidden/W/b
            h_full = hidden.clone().requires_grad_(True)
            w_full = weight.clone().requires_grad_(True)
            b_full = bias.clone().requires_grad_(True) if with_bias else None
            logits = h_full @ w_full.T + (b_full if with_bias else 0.0)
            truth = rf.ppo_loss(logits, targets, adv, old, ref_lp, mask, backend="eager", **options)
            truth.loss.backward()
            # this rank: its rows of W and b; rank-dependent chunk sizes (the smallest one is used)
            h = hidden.clone().requires_grad_(True)
            w = weight[lo:hi].clone().requires_grad_(True)
            b = bias[lo:hi].clone().requires_grad_(True) if with_bias else None
            chunk = None if i == 0 else 5 + rank
            out = rf.fused_linear_ppo_loss(h, w, targets, adv, old, ref_lp, mask, bias=b, chunk_size=chunk,
                                           backend=backend, process_group=group, **options)
            out.loss.backward()
            what = f"rank {rank}/{world} {backend} {options}"
            # The gradients of hidden, W and b are matmul-style sums: d(hidden) over the
            # vocabulary, which the ranks split and all-reduce; d(W) and d(b) over the tokens,
            # which the fused path walks in chunks. Their summation order cannot match one
            # process's matmul (itself thread-order dependent: MKL adapts its threads to the
            # load), so fp32 rounding differs by a few ulps of the partial sums. They are held
            # to the contract's double baseline instead: error against fp64 truth at most 2× the
            # one-process fp32 error, + 1e-6. Everything else is compared at fp32 tolerance.
            h64 = hidden.double().requires_grad_(True)
            w64 = weight.double().requires_grad_(True)
            b64 = bias.double().requires_grad_(True) if with_bias else None
            logits64 = h64 @ w64.T + (b64 if with_bias else 0.0)
            rf.ppo_loss(logits64, targets, adv, old, ref_lp, mask, backend="eager", **options).loss.backward()
            grads = {"grad hidden": (h.grad, h_full.grad, h64.grad),
                     "grad weight shard": (w.grad, w_full.grad[lo:hi], w64.grad[lo:hi])}
            if with_bias:
                grads["grad bias shard"] = (b.grad, b_full.grad[lo:hi], b64.grad[lo:hi])
            for name, (got, one_process, exact) in grads.items():
                err = max_error(got, exact)
                bound = DOUBLE_BASELINE_FACTOR * max_error(one_process, exact) + DOUBLE_BASELINE_ATOL
                assert err <= bound, f"{what} {name}: error {err:.3g} vs fp64 > bound {bound:.3g}"
            pairs = {"loss": (out.loss, truth.loss), "logprobs": (out.logprobs, truth.logprobs),
                     "entropy": (out.entropy, truth.entropy)}
            assert set(out.metrics) == set(truth.metrics)
            pairs.update({f"metric {k}": (out.metrics[k], v) for k, v in truth.metrics.items()})
            for name, (got, expected) in pairs.items():
                torch.testing.assert_close(got, expected, **tol, msg=lambda m, n=name, w=what: f"{w} {n}: {m}")
            valid_targets = targets[mask]
            assert ((valid_targets >= lo) & (valid_targets < hi)).any(), f"{what}: no target on this shard"
            # no-grad pass for old/ref log-probs
            lp, entropy = rf.fused_linear_logprobs(hidden, weight[lo:hi], targets, mask, bias=b,
                                                   temperature=0.9, with_entropy=True, chunk_size=chunk,
                                                   backend=backend, process_group=group)
            lp_truth, entropy_truth = rf.logprobs(logits.detach(), targets, mask, temperature=0.9,
                                                  with_entropy=True, backend="eager")
            torch.testing.assert_close(lp, lp_truth, **tol, msg=lambda m, w=what: f"{w} lp: {m}")
            torch.testing.assert_close(entropy, entropy_truth, **tol, msg=lambda m, w=what: f"{w} entropy: {m}")
        _check_bf16(rank, world, lo, hi, vocab, backend)
        # hidden must be replicated: a different token count on one rank is an error on every rank
        n_tokens = 4 if rank == 0 else 5
        try:
            rf.fused_linear_logprobs(torch.randn(n_tokens, 16), torch.randn(hi - lo, 16),
                                     torch.zeros(n_tokens, dtype=torch.long), backend=backend, process_group=group)
        except ValueError as exc:
            assert "replicated" in str(exc), exc
        else:
            raise AssertionError("hidden of different lengths across ranks was accepted")


BACKENDS = ["eager"] + (["cpp"] if HAS_CPP else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,vocab", [(2, 129), (3, 130)])
def test_fused_linear_vocab_parallel_matches_single_process(world, vocab, backend, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), backend, vocab), nprocs=world, join=True)
