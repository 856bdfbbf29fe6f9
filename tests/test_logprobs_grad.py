"""Differentiable log-probs and entropy (``rf.logprobs`` and ``rf.fused_linear_logprobs`` with grad):
the gradient of a caller-written function of (lp, H) through every backend's fused backward equals
eager autograd through ``log_softmax``, at the contract's fp32 tolerances."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_BACKENDS, device_for
from helpers import TOLERANCES, make_case

import rlhf_fast as rf

FP32 = TOLERANCES[torch.float32]


def _caller_loss(lp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a trainer writes on [B, T] tensors: a non-linear function of both (verl / TRL style)."""
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(lp.shape, generator=gen).to(lp.device)
    m = mask.to(lp.dtype)
    return (weights * lp * m).sum() + 0.3 * ((entropy * m) ** 2).sum() - 0.1 * (torch.exp(lp) * m).sum()


def _eager_truth(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float):
    x = logits.float() / temperature
    log_p = torch.log_softmax(x, -1)
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    lp = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros_like(lp)
    return torch.where(mask, lp, zero), torch.where(mask, entropy, zero)


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logprobs_gradient_matches_autograd(backend, temperature, strided, use_backend):
    name = use_backend(backend)
    case = make_case(3, 5, 129, strided=strided, seed=8, device=device_for(backend))
    mask = case.mask
    base = case.logits_base.detach().clone().requires_grad_(True)
    logits = base[:, :-1] if strided else base
    lp, entropy = rf.logprobs(logits, case.targets, mask, temperature=temperature, with_entropy=True, backend=name)
    assert lp.requires_grad and entropy.requires_grad and lp.dtype == torch.float32
    _caller_loss(lp, entropy, mask).backward()

    truth_base = case.logits_base.detach().clone().requires_grad_(True)
    truth_logits = truth_base[:, :-1] if strided else truth_base
    want_lp, want_entropy = _eager_truth(truth_logits, case.targets, mask, temperature)
    _caller_loss(want_lp, want_entropy, mask).backward()
    torch.testing.assert_close(lp, want_lp, **FP32)
    torch.testing.assert_close(entropy, want_entropy, **FP32)
    torch.testing.assert_close(base.grad, truth_base.grad, **FP32)
    assert not base.grad[0].any(), "a fully masked sequence gets no gradient"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logprobs_without_entropy_and_without_grad(backend, use_backend):
    name = use_backend(backend)
    case = make_case(2, 4, 129, seed=9, device=device_for(backend))
    base = case.logits_base.detach().clone().requires_grad_(True)
    lp = rf.logprobs(base, case.targets, case.mask, backend=name)
    (lp * 2.0).sum().backward()
    truth = case.logits_base.detach().clone().requires_grad_(True)
    (_eager_truth(truth, case.targets, case.mask, 1.0)[0] * 2.0).sum().backward()
    torch.testing.assert_close(base.grad, truth.grad, **FP32)
    with torch.no_grad():
        assert not rf.logprobs(base, case.targets, case.mask, backend=name).requires_grad
    assert not rf.logprobs(base.detach(), case.targets, case.mask, backend=name).requires_grad


def test_banned_tokens_and_all_banned_masked_rows_give_finite_gradients():
    logits = torch.randn(2, 3, 50)
    logits[0, 0, 10:] = float("-inf")  # banned tokens on a valid row
    logits[1, 2] = float("-inf")  # a masked row whose logits are all −inf
    targets = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    for backend in ["eager"] + [b for b in ("cpp",) if rf.backends.load_ops(b)[0] is not None]:
        x = logits.clone().requires_grad_(True)
        lp, entropy = rf.logprobs(x, targets, mask, with_entropy=True, backend=backend)
        (lp.sum() + entropy.sum()).backward()
        assert torch.isfinite(x.grad).all(), backend
        assert not x.grad[1, 2].any(), backend


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("backend", ["eager"] + [b for b in ALL_BACKENDS if b in ("cpp", "triton")])
def test_fused_linear_logprobs_gradient_matches_autograd(backend, chunk_size, with_bias, use_backend):
    name = use_backend(backend)
    device = device_for(backend)
    gen = torch.Generator().manual_seed(12)
    hidden = (torch.randn(3, 6, 16, generator=gen) * 0.5).to(device).requires_grad_(True)
    weight = (torch.randn(97, 16, generator=gen) * 0.5).to(device).requires_grad_(True)
    bias = (torch.randn(97, generator=gen) * 0.1).to(device).requires_grad_(True) if with_bias else None
    targets = torch.randint(0, 97, (3, 6), generator=gen).to(device)
    mask = (torch.rand(3, 6, generator=gen) > 0.2).to(device)
    lp, entropy = rf.fused_linear_logprobs(hidden, weight, targets, mask, bias=bias, temperature=0.8,
                                           with_entropy=True, chunk_size=chunk_size, backend=name)
    _caller_loss(lp, entropy, mask).backward()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    logits = hidden @ weight.T + (bias if bias is not None else 0.0)
    want_lp, want_entropy = _eager_truth(logits, targets, mask, 0.8)
    _caller_loss(want_lp, want_entropy, mask).backward()
    torch.testing.assert_close(lp, want_lp, **FP32)
    torch.testing.assert_close(entropy, want_entropy, **FP32)
    for g, t in zip(got, leaves):
        torch.testing.assert_close(g, t.grad, **FP32)
