"""The numerical edges of the contract, one regression test per case, on every backend through the
public API: finite inputs give finite outputs and gradients wherever the math is finite, NaN inputs
at valid positions reach the loss, constants get no gradient, every backend agrees at the edges,
and bad values are refused with a ValueError naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKENDS, HAS_CPP, device_for

import rlhf_fast as rf
from rlhf_fast.loss.functional import row_ops

BACKENDS = ["eager"] + ALL_BACKENDS  # eager, the reference as a row backend, C++, Triton (interpreter)
FP32 = dict(rtol=1e-5, atol=1e-6)


def _loss(backend, logits, targets, advantages, old=None, ref=None, mask=None, **options):
    x = logits.detach().clone().to(device_for(backend)).requires_grad_(True)
    put = lambda t: None if t is None else t.to(x.device)  # noqa: E731
    out = rf.ppo_loss(x, put(targets), put(advantages), put(old), put(ref), put(mask), backend=backend, **options)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_keep_their_digits_at_large_offsets(backend, use_backend):
    name = use_backend(backend)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 1000, generator=gen) * 10
    targets = logits.argmax(-1)
    truth = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    lp = rf.logprobs(logits.to(device_for(backend)), targets.to(device_for(backend)), backend=name).cpu()
    torch.testing.assert_close(lp.double(), truth, **FP32)
    for offset in (1e4, 1e30):
        row = torch.tensor([[offset + 1.0, offset, offset - 1.0]]) if offset < 1e20 else \
            torch.tensor([[offset, offset, offset]])
        want = torch.log_softmax((row - row.max()).double(), -1)[0, 1]
        got = rf.logprobs(row.to(device_for(backend)), torch.tensor([1]).to(device_for(backend)), backend=name)
        assert abs(got.item() - want.item()) < 1e-6, (offset, got.item(), want.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_equal_small_terms_beside_the_max_keep_the_sum_digits(backend, use_backend):
    """A row whose softmax sum is 1 plus thousands of equal terms of 1e-5: each addition to a running sum
    near 1 rounds the same way, so plain fp32 accumulation drifts by up to n·ulp/2 (≈ 5e-6 here). The
    log-prob and entropy must stay within a few fp32 ulps of the fp64 sum (eager's cascade sum: 6e-7)."""
    name = use_backend(backend)
    vocab = 4099  # two blocks of 2048 and a tail
    row = torch.full((vocab,), -1000.0)
    row[7] = -992.0  # the max, the target: e^((−1000 + 992)/0.7) ≈ 1.1e-5 for every other logit
    row[3000] = -996.0
    logits = row.to(torch.bfloat16).expand(2, vocab).clone()
    targets = torch.tensor([7, 3000])
    tau = 0.7
    z = (logits.float() / tau).double()  # the logits as every backend scales them (fp32 x/τ): the sum's error alone
    truth = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    truth_h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    dev = device_for(backend)
    lp, h = rf.logprobs(logits.to(dev), targets.to(dev), temperature=tau, with_entropy=True, backend=name)
    assert (lp.cpu().double() - truth).abs().max() < 2e-6, (lp - truth)  # 4 ulps at |lp| ≈ 5.8
    assert (h.cpu().double() - truth_h).abs().max() < 2e-6, (h - truth_h)


@pytest.mark.parametrize("advantage,options", [(0.0, {}), (1.0, {}), (-1.0, dict(dual_clip=3.0))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflowing_ratio_of_a_clipped_or_zero_advantage_token_is_finite(backend, advantage, options,
                                                                               use_backend):
    """log-ratio +100 (r = e^100 overflows fp32): the token's value is finite and its gradient 0."""
    name = use_backend(backend)
    logits = torch.zeros(1, 2, 2)
    old = torch.tensor([[math.log(0.5) - 100.0, math.log(0.5)]])
    adv = torch.tensor([[advantage, 0.5]])
    out, grad = _loss(name, logits, torch.zeros(1, 2, dtype=torch.long), adv, old, **options)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert not grad[0, 0].any(), "an overflowing token contributes no gradient"
    # the other token is unaffected: the same loss share and gradient as alone
    alone, alone_grad = _loss(name, logits[:, 1:], torch.zeros(1, 1, dtype=torch.long), adv[:, 1:], old[:, 1:],
                              **options)
    clipped_value = {0.0: 0.0, 1.0: -1.2, -1.0: 3.0}[advantage]  # −A·(1+ε), −c·A
    torch.testing.assert_close(out.loss.cpu(), (alone.loss.cpu() + clipped_value) / 2, **FP32)
    torch.testing.assert_close(grad[0, 1], alone_grad[0, 0] / 2, **FP32)


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflowing_kl_with_zero_kl_coef_is_only_a_metric(backend, estimator, use_backend):
    name = use_backend(backend)
    logits = torch.zeros(1, 2, 2)
    lp = math.log(0.5)
    ref = torch.tensor([[lp + 100.0, lp]])  # δ = 100: exp(δ) overflows fp32
    adv = torch.tensor([[1.0, -1.0]])
    with_ref, grad = _loss(name, logits, torch.zeros(1, 2, dtype=torch.long), adv, None, ref, kl_coef=0.0,
                           kl_estimator=estimator)
    without, grad_without = _loss(name, logits, torch.zeros(1, 2, dtype=torch.long), adv)
    torch.testing.assert_close(with_ref.loss, without.loss, **FP32)
    torch.testing.assert_close(grad, grad_without, **FP32)
    assert math.isinf(with_ref.metrics["kl"].item())  # the metric is the (overflowing) truth


def _truth(logits, targets, advantages, old=None, ref=None, mask=None, **options):
    """The fp64 truth: the eager reference on the same inputs upcast to fp64."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    return _loss("eager", logits.double(), targets, up(advantages), up(old), up(ref), mask, **options)


def _fp32_range(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all()) and float(value.abs().max()) <= torch.finfo(torch.float32).max


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kl_term_beyond_fp32_before_its_weight_is_finite(backend, estimator, use_backend):
    """k3 at δ = ref − lp = 90 with β = 0.05: e^90 overflows fp32 but β·e^90 = 6.1e37 does not; the loss and
    the gradient (about ±1e37) are finite and match the fp64 truth on every backend, and so does the kl metric
    over 4 tokens (e^90 / 4 = 3.1e38 fits; (e^89 + e^88.9) / 4 = 2.1e38 too, though no term does)."""
    name = use_backend(backend)
    logits = torch.tensor([[[1.0, 0.5, -0.3]] * 4])
    targets = torch.zeros(1, 4, dtype=torch.long)
    lp = torch.log_softmax(logits, -1)[..., 0]
    adv = torch.tensor([[0.0, 1.0, -0.5, 0.3]])
    options = dict(kl_coef=0.05, kl_estimator=estimator, entropy_coef=0.01)
    for deltas in ([90.0, 0.5, 0.1, -0.2], [89.0, 88.9, 0.1, -0.2]):
        ref = lp + torch.tensor([deltas])
        out, grad = _loss(name, logits, targets, adv, None, ref, **options)
        truth, truth_grad = _truth(logits, targets, adv, None, ref, **options)
        assert _fp32_range(truth.loss) and _fp32_range(truth_grad) and _fp32_range(truth.metrics["kl"])
        torch.testing.assert_close(out.loss.cpu().double(), truth.loss, **FP32)
        torch.testing.assert_close(grad.cpu().double(), truth_grad, **FP32)
        torch.testing.assert_close(out.metrics["kl"].cpu().double(), truth.metrics["kl"], **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ratio_beyond_fp32_before_its_weight_is_finite(backend, use_backend):
    """An unclipped ratio e^90 on one of two tokens, A = −0.33, token-mean: each token's −A·r = 4e38 overflows
    fp32, its weighed half (the loss, 2.0e38) and the pg_loss metric do not; the gradient is finite, and so are
    the ratio_mean and approx_kl of a ratio e^89 over four tokens."""
    name = use_backend(backend)
    logits = torch.tensor([[[1.0, 0.5, -0.3], [0.2, 0.1, 0.0]]])
    targets = torch.tensor([[0, 1]])
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    adv = torch.tensor([[-0.33, 0.5]])
    for shift, metrics in ((90.0, ("pg_loss",)), (89.0, ("pg_loss", "ratio_mean", "approx_kl"))):
        old = lp - torch.tensor([[shift, 0.0]])
        rows = (logits, targets, adv, old) if shift == 90.0 else \
            (logits.repeat(1, 2, 1), targets.repeat(1, 2), adv.repeat(1, 2), old.repeat(1, 2))
        out, grad = _loss(name, *rows)
        truth, truth_grad = _truth(*rows)
        assert _fp32_range(truth.loss) and _fp32_range(truth_grad), (shift, truth.loss)
        torch.testing.assert_close(out.loss.cpu().double(), truth.loss, **FP32)
        torch.testing.assert_close(grad.cpu().double(), truth_grad, **FP32)
        for metric in metrics:
            assert _fp32_range(truth.metrics[metric]), (metric, truth.metrics[metric])
            torch.testing.assert_close(out.metrics[metric].cpu().double(), truth.metrics[metric], **FP32,
                                       msg=lambda m, k=metric: f"{k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_coefficient_near_the_fp32_maximum_at_a_low_temperature_is_finite(backend, use_backend):
    """w·dℓ/dlp = 3e38 at τ = 0.7: dividing it by τ first would overflow; the gradient, c·(1[j=y] − p_j)/τ with
    p_y = 1/2, is 2.1e38 at most and finite on every backend."""
    name = use_backend(backend)
    logits = torch.tensor([[[0.7, 0.7, -1e4]]])  # p = (1/2, 1/2, 0) at τ = 0.7, a banned-like third entry
    targets = torch.zeros(1, 1, dtype=torch.long)
    old = torch.tensor([[math.log(0.5) - math.log(3e38)]])  # r = 3e38
    adv = torch.tensor([[-1.0]])
    out, grad = _loss(name, logits, targets, adv, old, temperature=0.7)
    truth, truth_grad = _truth(logits, targets, adv, old, temperature=0.7)
    assert _fp32_range(truth.loss) and _fp32_range(truth_grad)
    torch.testing.assert_close(out.loss.cpu().double(), truth.loss, **FP32)
    torch.testing.assert_close(grad.cpu().double(), truth_grad, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_beyond_fp32_is_inf_on_every_backend_never_nan(backend, use_backend):
    """An unclipped ratio e^100 with A = −0.33 (−A·r/2 = 4.4e42), and k3 at δ = 100 with β = 0.05: the loss is
    +inf; the gradient is ±inf or finite, never NaN (an entry of probability 0 gets 0)."""
    name = use_backend(backend)
    logits = torch.tensor([[[1.0, 0.5, float("-inf")], [0.2, 0.1, 0.0]]])
    targets = torch.tensor([[0, 1]])
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    for old, ref, options in ((lp - torch.tensor([[100.0, 0.0]]), None, {}),
                              (None, lp + torch.tensor([[100.0, 0.0]]), dict(kl_coef=0.05, kl_estimator="k3"))):
        out, grad = _loss(name, logits, targets, torch.tensor([[-0.33, 0.5]]), old, ref, **options)
        assert out.loss.item() == float("inf"), out.loss
        assert not torch.isnan(grad).any(), grad
        assert grad[0, 0, 2] == 0.0 and torch.isinf(grad[0, 0, :2]).all()


# Confident targets: p_y = 0.99993, so 1 − p_y loses three digits to cancellation unless it is taken as
# Σ_{j≠y} p_j; a large advantage (1e6) puts those digits in the gradient (the true entry is −70.7984).
CONFIDENT = torch.tensor([10.33, 0.13, 0.03])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_confident_target_keeps_the_digits_of_its_gradient(backend, use_backend):
    """d(loss)/d(logits) at logits [10.33, 0.13, 0.03], target 0, A = 1e6 against the fp64 truth (fp32
    tolerances), through rf.ppo_loss (one row; and a 2049-logit row, which the Triton backward splits across
    programs) and the differentiable rf.logprobs."""
    name = use_backend(backend)
    dev = device_for(backend)
    short = CONFIDENT.view(1, 1, 3)
    long = torch.full((1, 2, 2049), -30.0)
    long[0, :, :3] = CONFIDENT
    long[0, 1, 1500] = 10.33 - 3.0  # a second row whose target is not the max
    for logits, targets in ((short, torch.zeros(1, 1, dtype=torch.long)), (long, torch.tensor([[0, 1500]]))):
        adv = torch.full(targets.shape, 1e6)
        out, grad = _loss(name, logits, targets, adv, temperature=1.0)
        truth, truth_grad = _truth(logits, targets, adv)
        torch.testing.assert_close(grad.cpu().double(), truth_grad, **FP32)
        x = logits.clone().to(dev).requires_grad_(True)
        lp = rf.logprobs(x, targets.to(dev), backend=name)
        (lp_grad,) = torch.autograd.grad((1e6 * lp).sum(), x)
        x64 = logits.double().requires_grad_(True)
        (want,) = torch.autograd.grad((1e6 * torch.log_softmax(x64, -1).gather(-1, targets[..., None])).sum(), x64)
        torch.testing.assert_close(lp_grad.cpu().double(), want, **FP32)
    short_grad = _loss(name, short, torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 1e6))[1]
    assert abs(short_grad[0, 0, 0].item() - (-70.7984)) < 1e-3, short_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_in_the_forward_at_the_edges(backend, use_backend):
    """grad_in_forward=True on rows of 16 logits (the Triton one-kernel path): a confident target with A = 1e6,
    an unclipped ratio e^90 (A = −0.33) and k3 at δ = 90 (β = 0.05) give the fp64 truth's loss and gradient."""
    name = use_backend(backend)
    logits = torch.full((1, 3, 16), -30.0)
    logits[0, :, :3] = CONFIDENT
    logits[0, 1:, :3] = torch.tensor([1.0, 0.5, -0.3])
    targets = torch.zeros(1, 3, dtype=torch.long)
    lp = torch.log_softmax(logits, -1)[..., 0]
    adv = torch.tensor([[1e6, -0.33, 0.5]])
    old = lp - torch.tensor([[0.0, 90.0, 0.0]])
    ref = lp + torch.tensor([[0.0, 0.0, 90.0]])
    for options in (dict(), dict(kl_coef=0.05, kl_estimator="k3", temperature=0.9)):
        out, grad = _loss(name, logits, targets, adv, old, ref, grad_in_forward=True, **options)
        truth, truth_grad = _truth(logits, targets, adv, old, ref, **options)
        assert _fp32_range(truth.loss) and _fp32_range(truth_grad)
        torch.testing.assert_close(out.loss.cpu().double(), truth.loss, **FP32)
        torch.testing.assert_close(grad.cpu().double(), truth_grad, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_of_minus_inf_or_nan_get_a_zero_gradient(backend, use_backend):
    name = use_backend(backend)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 17, generator=gen)
    logits[0, 1] = float("-inf")
    logits[1, 2] = float("nan")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    adv = torch.randn(2, 3, generator=gen)
    old = torch.randn(2, 3, generator=gen) - 3
    targets = torch.randint(0, 17, (2, 3), generator=gen)
    out, grad = _loss(name, logits, targets, adv, old, old, mask, kl_coef=0.1, entropy_coef=0.01)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert not grad[0, 1].any() and not grad[1, 2].any()
    everything_masked, grad = _loss(name, logits, targets, adv, old, old, torch.zeros_like(mask), kl_coef=0.1)
    assert everything_masked.loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_ref_and_advantages_are_constants(backend, use_backend):
    """Inputs that require grad (an undetached critic, old log-probs from the same logits) get none."""
    name = use_backend(backend)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (2, 3), generator=gen)
    adv = torch.randn(2, 3, generator=gen, requires_grad=True)
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)  # not detached
    ref = (old.detach() + 0.1).requires_grad_(True)
    out = rf.ppo_loss(logits, targets, adv, old, ref, kl_coef=0.1, backend=name)
    out.loss.backward()
    assert adv.grad is None and ref.grad is None
    # old carries a graph back to the logits: the loss's gradient must not flow through it either
    detached = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out2 = rf.ppo_loss(detached, targets, adv.detach(), old.detach(), ref.detach(), kl_coef=0.1, backend=name)
    out2.loss.backward()
    torch.testing.assert_close(logits.grad, detached.grad, **FP32)


@pytest.mark.parametrize("where", ["old", "advantages", "ref"])
@pytest.mark.parametrize("advantage", [0.0, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_a_valid_position_reaches_the_loss(backend, advantage, where, use_backend):
    name = use_backend(backend)
    logits = torch.zeros(1, 2, 3)
    old = torch.full((1, 2), math.log(1 / 3))
    ref = old.clone()
    adv = torch.full((1, 2), advantage)
    {"old": old, "advantages": adv, "ref": ref}[where][0, 0] = float("nan")
    out, _ = _loss(name, logits, torch.zeros(1, 2, dtype=torch.long), adv, old, ref, kl_coef=0.1)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_into_memory_that_overlaps_itself_is_refused(backend, use_backend):
    name = use_backend(backend)
    logits = torch.randn(3, 1, 7).expand(3, 4, 7).to(device_for(backend))
    with pytest.raises(ValueError, match="share memory"):
        rf.ppo_loss(logits, torch.zeros(3, 4, dtype=torch.long, device=logits.device),
                    torch.zeros(3, 4, device=logits.device), inplace_backward=True, backend=name)


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["two-pass", "grad-in-forward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_logits_get_the_summed_gradient(backend, grad_in_forward, use_backend):
    """One row of logits shared by two sequences (an expanded, stride-0 view): the gradient of its source is
    the sum over the sequences, as for the materialised copy, for the loss and the differentiable log-probs.

    V = 16 takes the Triton gradient-in-forward kernel's own path (rows of whole 16-byte vectors)."""
    name = use_backend(backend)
    gen = torch.Generator().manual_seed(5)
    source = torch.randn(1, 3, 16, generator=gen)
    targets = torch.tensor([[0, 1, 2], [3, 15, 0]])
    adv = torch.tensor([[1.0, -1.0, 0.5], [-0.5, 2.0, 1.0]])
    old = torch.randn(2, 3, generator=gen) - 2.0
    ref = torch.randn(2, 3, generator=gen) - 2.0
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.9)

    def grads(materialise: bool):
        x = source.clone().to(device_for(backend)).requires_grad_(True)
        logits = x.expand(2, 3, 16)
        if materialise:
            logits = logits.contiguous()  # a copy: its backward sums over the two sequences, as expand's does
        put = lambda t: t.to(x.device)  # noqa: E731
        out = rf.ppo_loss(logits, put(targets), put(adv), put(old), put(ref), backend=name,
                          grad_in_forward=grad_in_forward, **options)
        (loss_grad,) = torch.autograd.grad(out.loss, x)
        lp, entropy = rf.logprobs(logits, put(targets), temperature=0.9, with_entropy=True, backend=name)
        (lp_grad,) = torch.autograd.grad((lp * put(adv)).sum() + entropy.sum(), x)
        return loss_grad.cpu(), lp_grad.cpu()

    for got, want in zip(grads(materialise=False), grads(materialise=True), strict=True):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_hidden_states_get_the_summed_gradient(backend, use_backend):
    """The fused-linear loss on expanded hidden states (one sequence's states scored twice) equals its
    loss on the materialised copy, gradients included (the chunks are its own buffers)."""
    name = use_backend(backend)
    gen = torch.Generator().manual_seed(6)
    dev = device_for(backend)
    source, weight = torch.randn(1, 3, 16, generator=gen).to(dev), torch.randn(11, 16, generator=gen).to(dev)
    targets = torch.tensor([[0, 1, 2], [3, 10, 0]], device=dev)
    adv = torch.tensor([[1.0, -1.0, 0.5], [-0.5, 2.0, 1.0]], device=dev)
    runs = []
    for materialise in (False, True):
        h, w = source.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        hidden = h.expand(2, 3, 16)
        hidden = hidden.contiguous() if materialise else hidden
        out = rf.fused_linear_ppo_loss(hidden, w, targets, adv, entropy_coef=0.01, backend=name)
        runs.append(torch.autograd.grad(out.loss, (h, w)))
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, **FP32)


def _raw_backward_inputs(rows: int):
    gen = torch.Generator().manual_seed(8)
    vectors = [torch.randn(rows, generator=gen) for _ in range(3)]
    row_max, entropy, coef = vectors
    log_sum = torch.rand(rows, generator=gen) + 2.0
    return torch.zeros(rows, dtype=torch.long), row_max, log_sum, entropy.abs(), coef, coef * 0.1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_gradient_buffer_that_is_not_provably_disjoint_from_the_logits_is_refused(backend, use_backend):
    """The raw backward of every backend: ``out`` overlapping non-dense logits in another layout, or sharing
    memory itself, is a ValueError naming it; the logits' own memory in their own layout (in place) and any
    disjoint buffer, non-dense ones included, give the gradient of a fresh buffer."""
    name = use_backend(backend)
    ops = row_ops(name)
    put = lambda t: t.to(device_for(backend))  # noqa: E731
    targets, row_max, log_sum, entropy, coef_lp, coef_h = (put(t) for t in _raw_backward_inputs(6))
    base = put(torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(9)))

    def backward(logits, out):
        ops.backward(logits, targets, row_max, log_sum, entropy, coef_lp, coef_h, 0.8, out)
        return out

    logits = base[:, :3, :8]  # non-dense: every row skips one element, every sequence one row
    want = backward(logits, torch.empty(logits.shape, device=logits.device)).clone()
    with pytest.raises(ValueError, match="out: the gradient buffer overlaps the logits"):
        backward(logits, base[:, 1:, 1:])  # shifted by one row and one column: partly over the logits
    with pytest.raises(ValueError, match="out: elements of the gradient buffer share memory"):
        backward(logits, put(torch.zeros(2, 1, 8)).expand(2, 3, 8))
    disjoint = put(torch.full((2, 5, 10), float("nan")))[:, 1:4, 2:]
    torch.testing.assert_close(backward(logits, disjoint), want, rtol=0, atol=0)
    in_place = base.clone()
    same_memory = backward(in_place[:, :3, :8], in_place[:, :3, :8])  # two views, one layout: in place
    torch.testing.assert_close(same_memory, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_jump_of_the_row_max_keeps_the_entropy_finite(backend, use_backend):
    name = use_backend(backend)
    row = torch.full((1, 1, 4100), -1e36)
    row[0, 0, 2048:] = 1e36  # the max jumps at a 2048-logit block boundary
    row[0, 0, 3000] = 1e36 + 1e30
    lp, entropy = rf.logprobs(row.to(device_for(backend)), torch.tensor([[3000]]).to(device_for(backend)),
                              with_entropy=True, backend=name)
    assert torch.isfinite(lp).all() and torch.isfinite(entropy).all()
    truth = torch.log_softmax(row.double(), -1)
    want_entropy = -(truth.exp() * torch.where(truth.exp() > 0, truth, 0.0)).sum(-1)
    torch.testing.assert_close(entropy.cpu().double(), want_entropy, **FP32)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is built in CI")
def test_empty_batch_with_a_vocabulary_strided_view():
    logits = torch.randn(2, 0, 10)[..., ::2]
    out = rf.ppo_loss(logits, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0), backend="cpp")
    assert out.loss.item() == 0.0


def test_fp64_runs_eager_and_an_explicit_fused_backend_refuses_it():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    targets = torch.zeros(2, 3, dtype=torch.long)
    assert rf.ppo_loss(logits, targets, torch.zeros(2, 3)).loss.dtype == torch.float64
    with pytest.raises(ValueError, match="backend='eager' or 'auto' for fp64"):
        rf.ppo_loss(logits, targets, torch.zeros(2, 3), backend="cpp")


BAD = [
    (dict(global_num_tokens=float("inf")), "global_num_tokens must be a finite number > 0"),
    (dict(global_num_tokens=float("nan")), "global_num_tokens must be a finite number > 0"),
    (dict(global_num_tokens=torch.tensor(-5.0)), "global_num_tokens must be a finite number > 0"),
    (dict(global_num_tokens=torch.tensor([3.0, 3.0, 3.0])), "one-element tensor"),
    (dict(global_num_tokens=torch.tensor([2.0, 2.0])), "one-element tensor"),
    (dict(clip_eps=1e300), "clip_eps must be < "),
    (dict(temperature=1e-50), "temperature must be ≥"),
    (dict(mask=torch.full((2, 3), 0.5)), "mask must be bool or hold only 0 and 1"),
]


@pytest.mark.parametrize("changes,message", BAD)
def test_bad_values_are_refused(changes, message):
    kwargs = dict(logits=torch.randn(2, 3, 5), targets=torch.zeros(2, 3, dtype=torch.long),
                  advantages=torch.zeros(2, 3), backend="eager")
    kwargs.update(changes)
    with pytest.raises(ValueError, match=_escape(message)):
        rf.ppo_loss(**kwargs)


def _escape(text: str) -> str:
    import re

    return re.escape(text)
