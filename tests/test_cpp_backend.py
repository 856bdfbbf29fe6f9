"""The C++ CPU backend: its row ops against the closed-form reference, low precision
against fp64 truth, the numerical edges (large offsets, overflowing ratios and KL, masked
rows holding anything, NaN inputs, row-max jumps, empty strided batches), thread-count
independence, every instruction-set build this CPU can run, torch.compile tracing, and the
error when it is not built.

The option grid over the public API lives in test_ppo_loss_grid.py (cpp is one of its
backends); this file checks what is specific to the extension.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import HAS_CPP
from helpers import TOLERANCES, assert_double_baseline, make_case, make_config, max_error, outputs_dict, run_loss

import rlhf_fast as rf
from rlhf_fast import backends
from rlhf_fast.backends.rows import KERNEL_OUTPUTS
from rlhf_fast.loss import reference

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension not built: {backends.load_ops('cpp')[1]}")
FP32 = TOLERANCES[torch.float32]
# Blocks of 2048 logits in the kernel: 1 (scalar tail only), a small odd V, one block with a
# tail, and several blocks (the online max rescale).
VOCABS = [1, 129, 2049, 5003]


def _ops():
    return backends.load_ops("cpp")[0]


def _rows(batch: int, seq: int, vocab: int, *, dtype=torch.float32, strided=True, seed=0, rising=False):
    """Logits as a [B, T, V] view (``[:, :-1]`` of a bigger buffer when strided), targets [N].

    ``rising`` sorts each row ascending so that every block raises the running max; three
    entries per row are −inf (banned tokens), never the target.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, seq + int(strided), vocab, generator=gen) * 2.0
    if rising:
        base = base.sort(-1).values
    targets = torch.randint(0, vocab, (batch * seq,), generator=gen)
    if vocab > 8:
        banned = torch.randint(0, vocab, (batch, seq, 3), generator=gen)
        own = targets.view(batch, seq, 1)
        banned = torch.where(banned == own, (own + 1) % vocab, banned)
        base[:, :seq].scatter_(-1, banned, float("-inf"))
    return base.to(dtype)[:, :seq], targets


def _strided_copy(logits: torch.Tensor) -> torch.Tensor:
    """A copy of a [B, T, V] view with the same strides (a [:, :-1] view of a new buffer)."""
    if logits.is_contiguous():
        return logits.clone()
    base = torch.empty(logits.shape[0], logits.shape[1] + 1, logits.shape[2], dtype=logits.dtype)
    base[:, -1] = 7.0
    view = base[:, :-1]
    view.copy_(logits)
    return view


def _per_row(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(n, generator=gen)
    old = torch.randn(n, generator=gen) - 5.0
    ref = torch.randn(n, generator=gen) - 5.0
    return adv, old, ref


def _assert_entropy_at_least_as_accurate(got, logits, targets, temperature):
    """Entropy: error vs fp64 truth ≤ the fp32 reference's own error + 1e-6.

    The reference's H = lse − Σ p·x loses ~|lse|·ulp to cancellation when H is small; the
    kernel's H = log s − Σ e·(x − m)/s does not, so an fp32-vs-fp32 comparison would test
    the reference's rounding rather than the kernel.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    truth = reference.selective_logprobs_entropy(flat.double(), targets, temperature)[1]
    ref32 = reference.selective_logprobs_entropy(flat, targets, temperature)[1]
    assert max_error(got, truth) <= max_error(ref32, truth) + 1e-6


# ---------------------------------------------------------------------------------------
# Row ops vs the closed-form reference
# ---------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("strided", [True, False])
def test_forward_matches_reference(vocab, temperature, strided):
    logits, targets = _rows(3, 4, vocab, strided=strided, seed=vocab, rising=vocab > 2048)
    assert logits.is_contiguous() != strided
    adv, old, ref = _per_row(targets.numel())
    cfg = make_config(dual_clip=3.0, clip_eps_high=0.28, kl_coef=0.1, entropy_coef=0.01,
                      temperature=temperature, has_old=True, has_ref=True)
    got = _ops().forward(logits, targets, adv, old, ref, cfg)
    want = reference.token_forward(logits, targets, adv, old, ref, cfg)
    for name in want._fields[:KERNEL_OUTPUTS]:
        if name == "entropy":
            _assert_entropy_at_least_as_accurate(got.entropy, logits, targets, temperature)
            continue
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **FP32, msg=name)
        assert getattr(got, name).dtype == torch.float32


@needs_cpp
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3+"])
@pytest.mark.parametrize("with_old,with_ref", [(True, True), (False, True), (True, False)])
def test_forward_options_match_reference(estimator, with_old, with_ref):
    logits, targets = _rows(2, 5, 129, seed=3)
    adv, old, ref = _per_row(targets.numel(), seed=4)
    old, ref = (old if with_old else None), (ref if with_ref else None)
    cfg = make_config(kl_coef=0.2 if with_ref else 0.0, kl_estimator=estimator, clip_eps=0.1,
                      has_old=with_old, has_ref=with_ref)
    got = _ops().forward(logits, targets.to(torch.int32), adv, old, ref, cfg)
    want = reference.token_forward(logits, targets, adv, old, ref, cfg)
    for name in ("logprobs", "ratio", "pg", "kl", "loss", "dlogp"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **FP32, msg=name)


@needs_cpp
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_matches_reference(vocab, temperature, inplace):
    logits, targets = _rows(3, 4, vocab, seed=vocab + 1, rising=vocab > 2048)
    n = targets.numel()
    lp, entropy, row_max, log_sum = reference.selective_logprobs_entropy(logits.reshape(-1, vocab), targets,
                                                                         temperature)
    gen = torch.Generator().manual_seed(5)
    coef_lp, coef_h = torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)
    want = reference.token_backward(logits, targets, row_max, log_sum, entropy, coef_lp, coef_h, temperature)
    if inplace:
        buffer = _strided_copy(logits)  # the same strided [:, :-1] layout, written in place
        assert buffer.stride() == logits.stride()
        _ops().backward(buffer, targets, row_max, log_sum, entropy, coef_lp, coef_h, temperature, buffer)
        got = buffer
        assert (buffer._base[:, -1] == 7.0).all()  # the column outside the view is untouched
    else:
        got = torch.full(logits.shape, float("nan"))
        _ops().backward(logits, targets, row_max, log_sum, entropy, coef_lp, coef_h, temperature, got)
    torch.testing.assert_close(got, want, **FP32)
    assert torch.isfinite(got).all()  # banned tokens give 0, never 0·(−inf)


@needs_cpp
def test_backward_target_on_other_shard_has_no_one_hot():
    logits, targets = _rows(2, 3, 129, seed=9)
    targets[::2] = -1  # vocabulary-parallel: the target lies on another shard
    lse = torch.logsumexp(logits.reshape(-1, 129), -1) + 0.5  # this shard's lse is not the row's
    zero = torch.zeros_like(lse)  # (m, log s) = (lse, 0) describe the same normaliser
    entropy, coef_lp, coef_h = torch.rand(6), torch.randn(6), torch.randn(6) * 0.1
    want = reference.token_backward(logits, targets, lse, zero, entropy, coef_lp, coef_h, 1.0)
    got = torch.empty(logits.shape)
    _ops().backward(logits, targets, lse, zero, entropy, coef_lp, coef_h, 1.0, got)
    torch.testing.assert_close(got, want, **FP32)


@needs_cpp
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_match_forward(with_entropy, dtype):
    logits, targets = _rows(2, 6, 1000, dtype=dtype, seed=11)
    lp, entropy, _, _ = _ops().logprobs(logits, targets, 0.8, with_entropy)[:4]
    fwd = _ops().forward(logits, targets, torch.zeros(12), None, None, make_config(temperature=0.8))
    torch.testing.assert_close(lp, fwd.logprobs, rtol=0, atol=0)  # the same row pass
    if with_entropy:
        torch.testing.assert_close(entropy, fwd.entropy, rtol=0, atol=0)
    else:
        assert entropy is None
    if dtype == torch.float32:
        want = reference.token_logprobs(logits, targets, 0.8, False).logprobs
        torch.testing.assert_close(lp, want, **FP32)


@needs_cpp
def test_nan_row_propagates_and_stays_in_its_row():
    logits, targets = _rows(2, 3, 129, seed=13)
    logits[1, 2, 7] = float("nan")
    cfg = make_config(kl_coef=0.1, entropy_coef=0.01, has_old=True, has_ref=True)
    adv, old, ref = _per_row(6)
    res = _ops().forward(logits, targets, adv, old, ref, cfg)
    for name, value in res._asdict().items():
        if name in ("log_scale", "kl_log_scale", "outside"):
            continue  # the scales of the values (0 for NaN), and no shards
        assert torch.isnan(value[5]), name
        assert torch.isfinite(value[:5]).all(), name
    grad = torch.empty(logits.shape)
    _ops().backward(logits, targets, res.row_max, res.log_sum, res.entropy, torch.ones(6), torch.ones(6), 1.0, grad)
    assert torch.isnan(grad[1, 2]).all() and torch.isfinite(grad.reshape(6, -1)[:5]).all()


@needs_cpp
def test_op_rejects_bad_arguments():
    logits, targets = _rows(1, 3, 50, seed=0)
    bad = targets.clone()
    bad[1] = 50
    with pytest.raises(RuntimeError, match="outside"):
        _ops().logprobs(logits, bad, 1.0, False)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        _ops().logprobs(logits, targets.float(), 1.0, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _ops().logprobs(logits.double(), targets, 1.0, False)
    buffer = torch.zeros(1, 4, 50)
    with pytest.raises(ValueError, match="out: the gradient buffer overlaps the logits"):
        _ops().backward(buffer[:, :3], targets, torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3),
                        torch.zeros(3), 1.0, buffer[:, 1:])


# ---------------------------------------------------------------------------------------
# Numerical edges through the public API: exact log-probs, finite wherever the math is
# finite, NaN inputs reach the loss
# ---------------------------------------------------------------------------------------


def _cpp_and_truth(logits, targets, advantages, old=None, ref=None, mask=None, **options):
    """(out, grad) of backend="cpp" and of the eager reference on the same inputs in fp64."""
    results = []
    for backend, dtype in (("cpp", logits.dtype), ("eager", torch.float64)):
        x = logits.detach().clone().to(dtype).requires_grad_(True)
        out = rf.ppo_loss(x, targets, advantages, old, ref, mask, backend=backend, **options)
        out.loss.backward()
        results.append((out, x.grad))
    return results


@needs_cpp
def test_logprobs_subtract_the_row_max_first():
    """lp = (x_y − m) − log s: ordinary logits with argmax targets, offsets of 1e4 and 1e30."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, 1000, generator=gen) * 10
    targets = logits.argmax(-1)  # lp ≈ −log s: x_y − (m + log s) loses ulp(m)
    torch.testing.assert_close(rf.logprobs(logits, targets, backend="cpp"),
                               rf.logprobs(logits, targets, backend="eager"), **FP32)
    for row, target, exact in (
        ([1e4 + 1, 1e4, 1e4 - 1], 0, torch.log_softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 0)[0]),
        ([1e30, 1e30, 1e30], 0, -math.log(3)),
    ):
        lp = rf.logprobs(torch.tensor([row]), torch.tensor([target]), backend="cpp")
        torch.testing.assert_close(lp.double(), torch.tensor([float(exact)], dtype=torch.float64), **FP32)
    # the backward's p = exp((x − m) − log s) at an offset of 1e4: the fp64 gradient
    logits = torch.randn(2, 3, 50, generator=gen) * 2 + 1e4
    targets = torch.randint(0, 50, (2, 3), generator=gen)
    (out, grad), (truth, truth_grad) = _cpp_and_truth(logits, targets, torch.randn(2, 3, generator=gen),
                                                      entropy_coef=0.1)
    torch.testing.assert_close(grad.double(), truth_grad, **FP32)
    torch.testing.assert_close(out.entropy.double(), truth.entropy, **FP32)


@needs_cpp
@pytest.mark.parametrize("old_logprob", [math.log(0.5) - 100.0, float("-inf")])
@pytest.mark.parametrize("advantage,dual_clip,loss", [(0.0, None, 0.0), (1.0, None, -1.2), (-1.0, 3.0, 3.0)])
def test_overflowing_ratio_gives_a_finite_loss_and_no_gradient(advantage, dual_clip, loss, old_logprob):
    """r = e^100 overflows fp32 (an old log-prob of −inf gives r = inf outright); a zero-advantage,
    clipped or dual-clipped token still contributes a finite value (0, −A·(1 + ε), −c·A) and
    exactly zero gradient, never 0·inf."""
    logits, targets = torch.zeros(1, 2), torch.tensor([0])
    old = torch.tensor([old_logprob])
    (out, grad), _ = _cpp_and_truth(logits, targets, torch.tensor([advantage]), old, dual_clip=dual_clip)
    assert out.loss.item() == pytest.approx(loss)
    assert (grad == 0).all()
    assert out.metrics["ratio_max"] == float("inf")  # the ratio itself did overflow


@needs_cpp
def test_overflowing_unclipped_ratio_is_infinite_not_nan():
    """A negative advantage without dual clip: −A·e^100 is beyond fp32, so the loss is +inf (not NaN)."""
    out = rf.ppo_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([-1.0]),
                      torch.tensor([math.log(0.5) - 100.0]), backend="cpp")
    assert out.loss.item() == float("inf")


@needs_cpp
@pytest.mark.parametrize("estimator", ["k3", "k3+"])
def test_zero_kl_coef_never_adds_an_overflowing_kl(estimator):
    """β = 0 with ref − lp = 100 (e^100 overflows): the loss and gradient are those without a
    reference; the kl metric reports the overflow; β > 0 gives +inf, never NaN."""
    logits, targets, adv = torch.zeros(1, 2), torch.tensor([0]), torch.tensor([1.0])
    ref = torch.tensor([math.log(0.5) + 100.0])
    (out, grad), _ = _cpp_and_truth(logits, targets, adv, None, ref, kl_coef=0.0, kl_estimator=estimator)
    (plain, plain_grad), _ = _cpp_and_truth(logits, targets, adv)
    assert out.loss.item() == plain.loss.item() and torch.equal(grad, plain_grad)
    assert out.metrics["kl"] == float("inf")
    with_kl = rf.ppo_loss(logits, targets, adv, None, ref, kl_coef=0.1, kl_estimator=estimator, backend="cpp")
    assert with_kl.loss.item() == float("inf")


@needs_cpp
@pytest.mark.parametrize("junk", [float("-inf"), float("nan"), float("inf"), 1e38])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_masked_rows_get_an_exact_zero_gradient_whatever_their_logits(junk, inplace_backward):
    """Masked rows may hold anything (all −inf, NaN padding): zero gradient there, and the rest of
    the call is exactly what it is with zeros in those rows."""
    case = make_case(3, 5, 129, seed=51, strided=True, mask="random")
    options = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, dual_clip=3.0,
                   inplace_backward=inplace_backward)
    clean, clean_grad = run_loss(case, "cpp", **options)
    dirty = case.logits_base.detach().clone()
    masked = torch.zeros(dirty.shape[:2], dtype=torch.bool)
    masked[:, :-1] = ~case.mask
    dirty[masked] = junk
    case.logits_base = dirty.requires_grad_(True)
    out, grad = run_loss(case, "cpp", **options)
    assert (grad[masked] == 0).all()
    assert torch.equal(grad, clean_grad) and torch.equal(out.loss, clean.loss)
    assert torch.equal(out.logprobs, clean.logprobs) and torch.equal(out.entropy, clean.entropy)
    for name, value in out.metrics.items():
        assert torch.equal(value, clean.metrics[name]), name
    everything = make_case(2, 3, 17, seed=52, mask="all-masked")
    with torch.no_grad():
        everything.logits_base.fill_(junk)
    out, grad = run_loss(everything, "cpp", **options)
    assert out.loss.item() == 0.0 and (grad == 0).all()


@needs_cpp
def test_backward_skips_rows_without_coefficients():
    """The op writes exact zeros where c_lp = c_H = 0, without reading the (NaN) logits."""
    logits, targets = _rows(2, 3, 129, seed=53)
    logits[0, 1] = float("nan")
    stats = _ops().logprobs(logits, targets, 1.0, True)
    coef = torch.ones(6)
    coef[1] = 0.0
    grad = torch.full(logits.shape, float("nan"))
    _ops().backward(logits, targets, stats.row_max, stats.log_sum, stats.entropy, coef, 0.1 * coef, 1.0, grad)
    assert (grad[0, 1] == 0).all() and torch.isfinite(grad).all()


@needs_cpp
@pytest.mark.parametrize("place", ["old_logprobs", "advantages", "ref_logprobs", "ref_logprobs, β = 0"])
@pytest.mark.parametrize("advantage,dual_clip", [(1.0, None), (-1.0, None), (-1.0, 3.0), (0.0, None)])
def test_nan_input_at_a_valid_position_reaches_the_loss(place, advantage, dual_clip):
    """NaN in an old / reference log-prob or an advantage at a valid token: NaN loss, whatever the
    clip (a NaN-dropping max / min or a zero-advantage shortcut would hide it)."""
    logits = torch.randn(1, 3, 7, generator=torch.Generator().manual_seed(54))
    targets, adv = torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), advantage)
    old, ref = torch.full((1, 3), -2.0), torch.full((1, 3), -2.0)
    {"old_logprobs": old, "advantages": adv}.get(place, ref)[0, 1] = float("nan")
    kl_coef = 0.0 if place.endswith("β = 0") else 0.1
    out = rf.ppo_loss(logits, targets, adv, old, ref, dual_clip=dual_clip, kl_coef=kl_coef, backend="cpp")
    assert torch.isnan(out.loss)


@needs_cpp
@pytest.mark.parametrize("low,high,start", [(-1e36, 1e36, 2048), (-1e37, 1e37, 2048), (-1e37, 1e37, 2055),
                                            (-3e38, 3e38, 2048)])
def test_row_max_jumping_between_blocks(low, high, start):
    """The max rises from −1e37 to 1e37 between two 2048-logit blocks: the earlier sums vanish
    (e^(−2e37) = 0), never 0·(s·shift) with s·shift = −inf. Exact log-probs, entropy, gradient."""
    logits = torch.full((1, 2, 4096), low)
    logits[..., start:] = high
    logits[0, 1, 4000] = high - abs(high) * 1e-6  # the second row's top block is not uniform
    targets = torch.tensor([[4001, 4001]])
    (out, grad), (truth, truth_grad) = _cpp_and_truth(logits, targets, torch.tensor([[1.0, -1.0]]),
                                                      entropy_coef=0.1)
    torch.testing.assert_close(out.logprobs.double(), truth.logprobs, **FP32)
    torch.testing.assert_close(out.entropy.double(), truth.entropy, **FP32)
    torch.testing.assert_close(grad.double(), truth_grad, **FP32)
    assert torch.isfinite(grad).all()


@needs_cpp
def test_empty_batch_with_a_strided_vocabulary():
    """T = 0 and logits[..., ::2]: nothing to compute, whatever the strides; loss 0, empty outputs."""
    base = torch.randn(2, 0, 10, requires_grad=True)
    logits, targets = base[..., ::2], torch.zeros(2, 0, dtype=torch.long)
    out = rf.ppo_loss(logits, targets, torch.zeros(2, 0), backend="cpp")
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.logprobs.shape == (2, 0) and base.grad.shape == (2, 0, 10)
    assert rf.logprobs(logits.detach(), targets, backend="cpp").shape == (2, 0)
    stats = _ops().logprobs(logits.detach(), targets.reshape(-1), 1.0, True)
    assert stats.logprobs.shape == (0,)


@needs_cpp
def test_inplace_backward_into_overlapping_memory_is_refused():
    """An expanded tensor cannot take its own gradient in place: a clear error, never a wrong gradient."""
    x = torch.randn(1, 1, 5, requires_grad=True)
    expanded = (x * 1.0).expand(1, 3, 5)
    with pytest.raises((ValueError, RuntimeError), match="share memory"):
        out = rf.ppo_loss(expanded, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), backend="cpp",
                          inplace_backward=True)
        out.loss.backward()
    logits, targets = _rows(1, 3, 5, strided=False)
    zeros = torch.zeros(3)
    with pytest.raises(ValueError, match="out: elements of the gradient buffer share memory"):
        _ops().backward(logits, targets, zeros, zeros, zeros, zeros + 1, zeros, 1.0,
                        torch.zeros(1, 1, 5).expand(1, 3, 5))


def test_fp64_logits_go_to_eager_or_are_refused_by_cpp():
    """fp64 is the eager reference's (gradcheck): ``auto`` runs eager; an explicit cpp request is a
    ValueError naming the argument and the fix."""
    case = make_case(2, 3, 17, seed=55, mask="none")
    logits = case.logits().detach().double()
    out = rf.ppo_loss(logits, case.targets, case.advantages, backend="auto")
    want = rf.ppo_loss(logits, case.targets, case.advantages, backend="eager")
    assert out.loss.dtype == torch.float64 and torch.equal(out.loss, want.loss)
    for call in (lambda: rf.ppo_loss(logits, case.targets, case.advantages, backend="cpp"),
                 lambda: rf.logprobs(logits, case.targets, backend="cpp")):
        with pytest.raises(ValueError, match=r"logits.*float64.*backend='eager' or 'auto'"):
            call()


# ---------------------------------------------------------------------------------------
# bf16 / fp16: the double baseline (the contract's accuracy section) through the public API
# ---------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_low_precision_double_baseline(dtype, temperature, inplace_backward):
    case = make_case(3, 6, 1000, dtype=dtype, strided=True, seed=21, banned_tokens=4)
    options = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, dual_clip=3.0, temperature=temperature)
    truth = outputs_dict(*run_loss(case, "eager", logits_dtype=torch.float64, **options))
    eager = outputs_dict(*run_loss(case, "eager", **options))
    out, grad = run_loss(case, "cpp", inplace_backward=inplace_backward, **options)
    assert grad.dtype == dtype
    assert_double_baseline(outputs_dict(out, grad), eager, truth, what=f"cpp {dtype}")


# ---------------------------------------------------------------------------------------
# Threads, instruction sets
# ---------------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_independent(dtype, restore_threads):
    """Rows are independent tasks, so 1 and 2 threads give bit-identical results."""
    case = make_case(8, 16, 1000, dtype=dtype, strided=True, seed=31)  # 128 rows: several tasks
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.7)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out, grad = run_loss(case, "cpp", **options)
        lp, entropy = rf.logprobs(case.logits().detach(), case.targets, case.mask, with_entropy=True,
                                  backend="cpp")
        results.append([out.loss, out.logprobs, out.entropy, grad, lp, entropy, *out.metrics.values()])
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def _cpu_flags() -> set:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isas_this_cpu_runs() -> list:
    """The kernel builds this CPU can execute, from its own flags (not from ATen, which honours
    ATEN_CPU_CAPABILITY=avx512 even on a CPU without AVX-512). The builds use
    -mavx2 -mfma -mf16c and -mavx512{f,bw,vl,dq} (setup.py)."""
    flags = _cpu_flags()
    isas = ["DEFAULT"]
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= flags:
        isas.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isas.append("AVX512")
    return isas


RUNNABLE_ISAS = _isas_this_cpu_runs()


@needs_cpp
def test_kernel_build_never_exceeds_the_cpu():
    """The dispatcher picks min(ATen's capability, what the CPU runs), whatever ATEN_CPU_CAPABILITY says.

    A CPU without AVX-512 cannot be borrowed here, so the rule itself is checked with injected
    capability strings and runnable sets; the set the library detects (cpuid) must equal the
    one /proc/cpuinfo reports.
    """
    _ops()  # loads the extension
    lib = torch.ops.rlhf_fast
    if _cpu_flags():
        assert lib.runnable_builds() == RUNNABLE_ISAS
    order = ["DEFAULT", "AVX2", "AVX512"]
    for runnable in (["DEFAULT"], ["DEFAULT", "AVX2"], ["DEFAULT", "AVX2", "AVX512"]):
        for capability in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", ""):
            ceiling = order.index(capability) if capability in order else 0
            want = order[min(ceiling, len(runnable) - 1)]
            assert lib.choose_kernel_build(capability, runnable) == want, (capability, runnable)
    assert lib.cpu_capability() == lib.choose_kernel_build(torch.backends.cpu.get_cpu_capability(),
                                                           lib.runnable_builds())


@needs_cpp
@pytest.mark.parametrize("capability", RUNNABLE_ISAS)
def test_every_isa_build_matches_reference(capability):
    """Each kernel build this CPU runs, chosen with ATEN_CPU_CAPABILITY in a subprocess, meets the
    fp32 tolerances, including the edges whose arithmetic depends on the vector width (a row max
    jumping by 2e37 between blocks: s·shift summed over fewer lanes overflows sooner)."""
    script = textwrap.dedent(
        """
        import math, sys, torch
        sys.path.insert(0, {tests!r})
        from rlhf_fast import backends
        from rlhf_fast.loss import reference
        from helpers import make_config
        from test_cpp_backend import _per_row, _rows
        ops = backends.load_ops("cpp")[0]
        import rlhf_fast.backends.cpp as cpp_ops
        print(cpp_ops.cpu_capability())
        for vocab in (129, 2049, 5003):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                logits, targets = _rows(2, 3, vocab, dtype=dtype, seed=vocab, rising=vocab > 2048)
                adv, old, ref = _per_row(6)
                cfg = make_config(kl_coef=0.1, entropy_coef=0.01, temperature=0.7, has_old=True, has_ref=True)
                got = ops.forward(logits, targets, adv, old, ref, cfg)
                want = reference.token_forward(logits, targets, adv, old, ref, cfg)
                for name in ("logprobs", "row_max", "log_sum", "ratio", "loss", "dlogp"):
                    torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
                # entropy: the reference's own cancellation error (see the helper above) is ~1e-5
                torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-5)
                c = torch.linspace(-1, 1, 6)
                grad = torch.empty(logits.shape, dtype=dtype)
                ops.backward(logits, targets, want.row_max, want.log_sum, want.entropy, c, 0.1 * c, 0.7, grad)
                expect = reference.token_backward(logits, targets, want.row_max, want.log_sum, want.entropy, c,
                                                  0.1 * c, 0.7)
                tol = dict(rtol=1e-5, atol=1e-6)
                if dtype != torch.float32:  # the same fp32 value rounded once: at most one ulp apart
                    tol = dict(rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-6)
                torch.testing.assert_close(grad, expect, **tol)
        for low, high, start in ((-1e36, 1e36, 2048), (-1e37, 1e37, 2048), (-1e37, 1e37, 2055)):
            row = torch.full((1, 1, 4096), low)
            row[..., start:] = high
            stats = ops.logprobs(row, torch.tensor([4000]), 1.0, True)
            n = 4096 - start
            torch.testing.assert_close(stats.logprobs, torch.tensor([-math.log(n)]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.entropy, torch.tensor([math.log(n)]), rtol=1e-5, atol=1e-6)
        big = torch.full((1, 1, 3), 1e30)
        lp = ops.logprobs(big, torch.tensor([0]), 1.0, False).logprobs
        torch.testing.assert_close(lp, torch.tensor([-math.log(3)]), rtol=1e-5, atol=1e-6)
        """
    ).format(tests=os.path.dirname(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == capability  # this CPU runs it, so the dispatcher picked it


# ---------------------------------------------------------------------------------------
# torch.compile, availability
# ---------------------------------------------------------------------------------------


@needs_cpp
def test_compile_traces_the_operators_in_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    case = make_case(2, 4, 65, strided=True, seed=41)
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.7, validate=False, backend="cpp")

    def step(x):
        out = rf.ppo_loss(x[:, :-1], case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                          case.mask, **options)
        lp = rf.logprobs(x[:, :-1].detach(), case.targets, case.mask, temperature=0.7, backend="cpp")
        return out.loss, out.metrics["approx_kl"], lp

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = case.logits_base.detach().clone().requires_grad_(True)
    loss, approx_kl, lp = compiled(x)
    loss.backward()
    assert counter.frame_count == 1
    targets = {  # nodes of the graph and of its subgraphs (the autograd.Function body)
        str(node.target) for g in counter.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
        for node in m.graph.nodes
    }
    for op in ("rlhf_fast.ppo_forward", "rlhf_fast.logprobs"):
        assert any(t.startswith(op) for t in targets), (op, sorted(targets))

    x_eager = case.logits_base.detach().clone().requires_grad_(True)
    want_loss, want_kl, want_lp = step(x_eager)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, **FP32)
    torch.testing.assert_close(approx_kl, want_kl, **FP32)
    torch.testing.assert_close(lp, want_lp, **FP32)
    torch.testing.assert_close(x.grad, x_eager.grad, **FP32)


def test_missing_extension_raises_with_build_hint(monkeypatch):
    """backend="cpp" without the extension: RuntimeError saying how to build; auto → eager."""
    monkeypatch.delitem(backends._loaded, "cpp", raising=False)
    monkeypatch.setitem(backends._failures, "cpp", "ImportError: rlhf_fast._C is not built (simulated)")
    case = make_case(2, 3, 17, mask="none")
    logits = case.logits().detach()
    with pytest.raises(RuntimeError, match=r"backend 'cpp' is not available.*pip install"):
        rf.ppo_loss(logits, case.targets, case.advantages, backend="cpp")
    with pytest.raises(RuntimeError, match="RLHF_FAST_BUILD_EXT"):
        rf.logprobs(logits, case.targets, backend="cpp")
    assert backends.resolve("auto", logits) == "eager"


def test_import_without_built_extension_fails_cleanly():
    """cpp_ops raises ImportError when rlhf_fast._C is absent; backends remembers why."""
    script = (
        "import sys; sys.modules['rlhf_fast._C'] = None\n"
        "from rlhf_fast import backends\n"
        "ops, why = backends.load_ops('cpp')\n"
        "assert ops is None and 'not built' in why and 'no-build-isolation' in why, why\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
