"""Every backend against the eager reference over the option grid (the contract's fp32 tolerances).

One test body serves all backends. The full product of options runs on the fast backends;
the Triton interpreter runs a pairwise cover of the same grid.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ALL_BACKENDS, FAST_BACKENDS, device_for, grid_params
from helpers import LOSS_AXES, assert_outputs_close, make_case, pairwise_cover, run_loss

import rlhf_fast as rf

FULL_GRID = [dict(zip(LOSS_AXES, values)) for values in itertools.product(*LOSS_AXES.values())]
COVER = pairwise_cover(LOSS_AXES)


@pytest.mark.parametrize("backend,options,seed", grid_params(ALL_BACKENDS, FULL_GRID, COVER))
def test_grid_matches_reference(backend, options, seed, use_backend):
    name = use_backend(backend)
    case = make_case(3, 5, 129, strided=True, seed=seed, device=device_for(backend))
    kwargs = dict(options, kl_coef=0.1)
    ref_out, ref_grad = run_loss(case, "eager", **kwargs)
    out, grad = run_loss(case, name, **kwargs)
    assert_outputs_close(out, grad, ref_out, ref_grad, what=f"{backend} {options}")


EDGE_CASES = {
    "V=1000": dict(shape=(2, 7, 1000)),
    "one-token": dict(shape=(1, 1, 129), mask="none"),
    "zero-tokens": dict(shape=(2, 0, 129), mask="none"),
    "all-masked": dict(shape=(2, 4, 129), mask="all-masked"),
    "int32-targets": dict(shape=(3, 5, 129), int32_targets=True),
    "per-sequence-advantages": dict(shape=(3, 5, 129), per_sequence_advantages=True),
    "on-policy": dict(shape=(3, 5, 129), with_old=False),
    "no-reference": dict(shape=(3, 5, 129), with_ref=False, kl_coef=0.0),
    "contiguous-no-mask": dict(shape=(2, 6, 129), strided=False, mask="none"),
    "banned-tokens": dict(shape=(2, 5, 129), banned_tokens=20),
    "global-num-tokens": dict(shape=(3, 5, 129), global_num_tokens=40),
    "inplace-backward": dict(shape=(3, 5, 129), inplace_backward=True),
    "inplace-backward-contiguous": dict(shape=(3, 5, 129), strided=False, inplace_backward=True),
    "dual-clip-clip-high-k3+": dict(shape=(3, 5, 129), dual_clip=2.0, clip_eps_high=0.3, kl_estimator="k3+"),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case_name", list(EDGE_CASES))
def test_edge_cases_match_reference(backend, case_name, use_backend):
    name = use_backend(backend)
    spec = dict(EDGE_CASES[case_name])
    b, t, v = spec.pop("shape")
    make_keys = {"mask", "int32_targets", "per_sequence_advantages", "with_old", "with_ref", "strided",
                 "banned_tokens"}
    make_kwargs = {k: spec.pop(k) for k in list(spec) if k in make_keys}
    make_kwargs.setdefault("strided", True)
    case = make_case(b, t, v, seed=7, device=device_for(backend), **make_kwargs)
    options = dict(dict(kl_coef=0.05, entropy_coef=0.01), **spec)
    ref_out, ref_grad = run_loss(case, "eager", **{k: v for k, v in options.items() if k != "inplace_backward"})
    out, grad = run_loss(case, name, **options)
    assert_outputs_close(out, grad, ref_out, ref_grad, what=f"{backend} {case_name}")
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_match_reference(backend, with_entropy, use_backend):
    import rlhf_fast as rf

    name = use_backend(backend)
    case = make_case(3, 5, 1000, strided=True, seed=3, device=device_for(backend), banned_tokens=5)
    logits = case.logits().detach()
    ref = rf.logprobs(logits, case.targets, case.mask, temperature=0.8, with_entropy=with_entropy, backend="eager")
    got = rf.logprobs(logits, case.targets, case.mask, temperature=0.8, with_entropy=with_entropy, backend=name)
    if not with_entropy:
        ref, got = (ref,), (got,)
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32 and g.shape == case.targets.shape and not g.requires_grad
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_nan_in_valid_row_propagates(backend, use_backend):
    name = use_backend(backend)
    case = make_case(2, 3, 129, mask="none", device=device_for(backend))
    base = case.logits_base.detach().clone()
    base[0, 1, 5] = float("nan")
    import rlhf_fast as rf

    out = rf.ppo_loss(base, case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                      kl_coef=0.1, backend=name)
    assert torch.isnan(out.loss)
    assert torch.isnan(out.logprobs[0, 1]) and torch.isfinite(out.logprobs[1]).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_in_the_forward_matches_the_eager_reference(backend, inplace, use_backend):
    """grad_in_forward=True (one kernel per row where the backend has one, else the usual two passes) and
    the two-pass backward both give eager's loss and d(logits) (autograd through plain PyTorch: an
    independent path), also for an upstream gradient that is not 1."""
    name = use_backend(backend)
    # a row that fits the one-kernel path, one that does not (odd V, strided), one too short for it (V = 8)
    for vocab, strided in ((1024, False), (129, True), (8, False)):
        case = make_case(2, 4, vocab, strided=strided, seed=31, device=device_for(backend))
        options = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
        runs = {}
        for run, grad_in_forward in (("eager", False), ("two-pass", False), ("grad-in-forward", True)):
            base = case.logits_base.detach().clone().requires_grad_(True)
            logits = (base[:, :-1] if strided else base) * 1.0  # a buffer the loss may overwrite
            out = rf.ppo_loss(logits, case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                              case.mask, backend="eager" if run == "eager" else name,
                              inplace_backward=inplace and run != "eager", grad_in_forward=grad_in_forward,
                              **options)
            (2.5 * out.loss).backward()
            runs[run] = (out.loss.detach(), base.grad)
        for run in ("two-pass", "grad-in-forward"):
            torch.testing.assert_close(runs[run][0], runs["eager"][0], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=run, v=vocab: f"{backend} V={v} {r} loss: {m}")
            torch.testing.assert_close(runs[run][1], runs["eager"][1], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=run, v=vocab: f"{backend} V={v} {r} d(logits): {m}")
