"""Logit transforms of the fused-linear loss (``logit_scale``, ``logit_softcap``) vs eager autograd.

The truth is ``rf.ppo_loss(f(hidden @ weight.T + bias), ..., backend="eager")`` (and
``rf.logprobs`` for the log-probs), with f(z) = c·tanh(s·z / c) written in plain PyTorch and
differentiated by autograd back to hidden, weight and bias. fp32: the contract's tolerances
(rtol 1e-5, atol 1e-6) on the loss, per-token outputs, metrics and gradients, on every row
backend; bf16: the double baseline against the fp64 truth.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CPP, HAS_TRITON, interpreted
from helpers import DOUBLE_BASELINE_ATOL, DOUBLE_BASELINE_FACTOR, TOLERANCES, max_error

import rlhf_fast as rf

FP32 = TOLERANCES[torch.float32]
ROW_BACKENDS = ["eager"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])
FAST_ROW_BACKENDS = [b for b in ROW_BACKENDS if not interpreted(b)]
TRANSFORMS = {"scale": (0.25, None), "softcap": (None, 2.5), "scale+softcap": (3.0, 4.0)}


def transform(z, scale, softcap):
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def make(seed=0, batch=3, seq=13, hidden_size=16, vocab=211, dtype=torch.float32, scale=None, softcap=None):
    """Inputs whose transformed logits reach the soft-cap's saturation (|s·z| up to ~3c) and old/ref near them."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (2.5 / hidden_size**0.5)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.rand(batch, seq, generator=gen) > 0.2
    mask[0, :] = False
    mask[1, 0] = True
    logits = transform(hidden.to(dtype).double() @ weight.to(dtype).double().T + bias.to(dtype).double(), scale,
                       softcap)
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    old = lp + 0.3 * torch.randn(lp.shape, generator=gen)
    ref = lp + 0.3 * torch.randn(lp.shape, generator=gen)
    advantages = torch.randn(batch, seq, generator=gen)
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), targets=targets, mask=mask,
                old=old, ref=ref, advantages=advantages)


def leaves(case, dtype=None):
    return [case[k].detach().clone().to(dtype or case[k].dtype).requires_grad_(True) for k in ("hidden", "weight",
                                                                                               "bias")]


def eager_loss(case, scale, softcap, dtype=None, **options):
    hidden, weight, bias = leaves(case, dtype)
    logits = transform(hidden @ weight.T + bias, scale, softcap)
    out = rf.ppo_loss(logits, case["targets"], case["advantages"], case["old"], case["ref"], case["mask"],
                      backend="eager", **options)
    out.loss.backward()
    return out, [hidden.grad, weight.grad, bias.grad]


def fused_loss(case, scale, softcap, backend, **options):
    hidden, weight, bias = leaves(case)
    out = rf.fused_linear_ppo_loss(hidden, weight, case["targets"], case["advantages"], case["old"], case["ref"],
                                   case["mask"], bias=bias, logit_scale=scale, logit_softcap=softcap, backend=backend,
                                   chunk_size=7, **options)
    out.loss.backward()
    return out, [hidden.grad, weight.grad, bias.grad]


OPTION_SETS = {
    "ppo": dict(kl_coef=0.1, entropy_coef=0.02, clip_eps_high=0.28, temperature=0.8),
    "ppo-seq-mean": dict(kl_coef=0.05, dual_clip=3.0, loss_agg="seq-mean-token-mean"),
    "gspo": dict(policy_loss="gspo", entropy_coef=0.01, loss_agg="seq-mean-token-mean", temperature=0.7),
    "cispo": dict(policy_loss="cispo", kl_coef=0.1, kl_ratio_weighted=True),
}


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("backend", FAST_ROW_BACKENDS)
def test_fused_linear_loss_matches_eager(backend, name, options):
    """The one-pass plain PPO path (gradients in the forward) and the variants' recomputing backward."""
    scale, softcap = TRANSFORMS[name]
    case = make(seed=1, scale=scale, softcap=softcap)
    want, want_grads = eager_loss(case, scale, softcap, **OPTION_SETS[options])
    got, got_grads = fused_loss(case, scale, softcap, backend, **OPTION_SETS[options])
    what = f"{backend} {name} {options}"
    torch.testing.assert_close(got.loss, want.loss, **FP32, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(got.logprobs, want.logprobs, **FP32, msg=lambda m: f"{what} logprobs: {m}")
    torch.testing.assert_close(got.entropy, want.entropy, **FP32, msg=lambda m: f"{what} entropy: {m}")
    for key, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[key], value, **FP32, msg=lambda m, k=key: f"{what} {k}: {m}")
    for label, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **FP32, msg=lambda m, n=label: f"{what} d{n}: {m}")


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_fused_linear_logprobs_gradient_matches_eager(backend, name, triton_env):
    """Differentiable log-probs and entropy: the backward recomputes the transformed chunk logits."""
    scale, softcap = TRANSFORMS[name]
    case = make(seed=2, batch=2, seq=9, vocab=97, scale=scale, softcap=softcap)
    weights_lp = torch.linspace(-1.0, 1.0, 18).view(2, 9)
    weights_h = torch.linspace(0.5, -0.3, 18).view(2, 9)
    hidden, weight, bias = leaves(case)
    lp, ent = rf.logprobs(transform(hidden @ weight.T + bias, scale, softcap), case["targets"], case["mask"],
                          temperature=0.9, with_entropy=True, backend="eager")
    ((lp * weights_lp).sum() + (ent * weights_h).sum()).backward()
    want = [lp.detach(), ent.detach(), hidden.grad, weight.grad, bias.grad]
    hidden, weight, bias = leaves(case)
    lp, ent = rf.fused_linear_logprobs(hidden, weight, case["targets"], case["mask"], bias=bias, temperature=0.9,
                                       with_entropy=True, chunk_size=5, backend=backend, logit_scale=scale,
                                       logit_softcap=softcap)
    ((lp * weights_lp).sum() + (ent * weights_h).sum()).backward()
    got = [lp.detach(), ent.detach(), hidden.grad, weight.grad, bias.grad]
    for label, g, w in zip(("logprobs", "entropy", "dhidden", "dweight", "dbias"), got, want, strict=True):
        torch.testing.assert_close(g, w, **FP32, msg=lambda m, n=label: f"{backend} {name} {n}: {m}")
    with torch.no_grad():  # the no-grad statistics pass
        lp_ng = rf.fused_linear_logprobs(case["hidden"], case["weight"], case["targets"], case["mask"],
                                         bias=case["bias"], temperature=0.9, chunk_size=5, backend=backend,
                                         logit_scale=scale, logit_softcap=softcap)
    torch.testing.assert_close(lp_ng, want[0], **FP32)


@pytest.mark.parametrize("options", ["ppo", "gspo"])
@pytest.mark.parametrize("backend", FAST_ROW_BACKENDS)
def test_bf16_double_baseline(backend, options):
    """bf16 hidden/weight/bias: error vs the fp64 truth ≤ 2× eager bf16's own error + 1e-6 (soft-cap and scale)."""
    scale, softcap = 0.5, 3.0
    case = make(seed=3, batch=4, seq=24, hidden_size=32, vocab=500, dtype=torch.bfloat16, scale=scale,
                softcap=softcap)
    truth, truth_grads = eager_loss(case, scale, softcap, dtype=torch.float64, **OPTION_SETS[options])
    eager, eager_grads = eager_loss(case, scale, softcap, **OPTION_SETS[options])
    got, got_grads = fused_loss(case, scale, softcap, backend, **OPTION_SETS[options])

    def values(out, grads):
        return {"loss": out.loss, "logprobs": out.logprobs, "entropy": out.entropy, "dhidden": grads[0],
                "dweight": grads[1], "dbias": grads[2]}

    t, e, g = values(truth, truth_grads), values(eager, eager_grads), values(got, got_grads)
    for key in t:
        err, bound = max_error(g[key], t[key]), DOUBLE_BASELINE_FACTOR * max_error(e[key], t[key]) + \
            DOUBLE_BASELINE_ATOL
        assert err <= bound, f"{backend} {options} {key}: error {err:.3g} > bound {bound:.3g}"


def test_no_transform_is_the_default_and_a_scale_of_one_changes_nothing():
    case = make(seed=4)
    base = rf.fused_linear_ppo_loss(case["hidden"], case["weight"], case["targets"], case["advantages"],
                                    case["old"], None, case["mask"], bias=case["bias"], backend="eager")
    one = rf.fused_linear_ppo_loss(case["hidden"], case["weight"], case["targets"], case["advantages"],
                                   case["old"], None, case["mask"], bias=case["bias"], backend="eager",
                                   logit_scale=1.0)
    torch.testing.assert_close(one.loss, base.loss, rtol=0, atol=0)
    capped = rf.fused_linear_ppo_loss(case["hidden"], case["weight"], case["targets"], case["advantages"],
                                      case["old"], None, case["mask"], bias=case["bias"], backend="eager",
                                      logit_softcap=0.5)
    assert not torch.allclose(capped.logprobs, base.logprobs)  # the cap is applied, not ignored


@pytest.mark.parametrize("name, value", [("logit_scale", 0.0), ("logit_scale", -1.0), ("logit_softcap", 0.0),
                                         ("logit_softcap", float("inf")), ("logit_softcap", float("nan")),
                                         ("logit_scale", True), ("logit_softcap", "30")])
def test_bad_transform_values_raise(name, value):
    case = make(seed=5)
    with pytest.raises(ValueError, match=name):
        rf.fused_linear_ppo_loss(case["hidden"], case["weight"], case["targets"], case["advantages"],
                                 mask=case["mask"], **{name: value})
    with pytest.raises(ValueError, match=name):
        rf.fused_linear_logprobs(case["hidden"], case["weight"], case["targets"], case["mask"], **{name: value})
