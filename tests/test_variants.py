"""Policy-loss variants (GSPO, CISPO, SAPO), rollout importance correction, peer conventions and
packed sequences: every backend against the eager reference, hand-computed values, the
sequence-level GSPO objective computed directly, packed = padded, gradcheck, bad values.

Tolerances: the contract's fp32 table (helpers.TOLERANCES) and, for bf16, the double baseline.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import ALL_BACKENDS, device_for, grid_params, interpreted
from helpers import (
    DOUBLE_BASELINE_ATOL,
    DOUBLE_BASELINE_FACTOR,
    TOLERANCES,
    assert_outputs_close,
    make_case,
    max_error,
    pairwise_cover,
    run_loss,
)

import rlhf_fast as rf

FP32 = TOLERANCES[torch.float32]

AXES = {
    "policy_loss": ["ppo", "gspo", "cispo", "sapo"],
    "rollout_is": ["none", "truncate", "mask"],
    "rollout_is_level": ["token", "sequence"],
    "kl_ratio_weighted": [False, True],
    "log_ratio_clamp": [None, 0.3],
    "kl_clamp": [None, 0.05],
    "kl_estimator": ["k1", "k3", "k3+"],
    "loss_agg": ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
}
COVER = pairwise_cover(AXES)


def _options(grid_point: dict) -> dict:
    options = dict(grid_point, kl_coef=0.1, entropy_coef=0.01, clip_eps_high=0.28, temperature=0.9)
    if options["policy_loss"] in ("ppo", "gspo"):
        options["dual_clip"] = 3.0
    if options["rollout_is"] != "none":
        options.update(rollout_is_min=0.8, rollout_is_max=1.15)
    return options


def _rollout(case, seed: int, scale: float = 0.2):
    """Inference-engine log-probs: the behaviour policy's, slightly off."""
    gen = torch.Generator().manual_seed(1000 + seed)
    noise = scale * torch.randn(case.old_logprobs.shape, generator=gen)
    return case.old_logprobs + noise.to(case.old_logprobs.device)


@pytest.mark.parametrize("backend,point,seed", grid_params(ALL_BACKENDS, COVER, COVER[:6]))
def test_variants_match_reference(backend, point, seed, use_backend):
    name = use_backend(backend)
    case = make_case(3, 6, 129, strided=True, seed=seed, device=device_for(backend))
    options = dict(_options(point), rollout_logprobs=_rollout(case, seed))
    ref_out, ref_grad = run_loss(case, "eager", **options)
    out, grad = run_loss(case, name, **options)
    assert_outputs_close(out, grad, ref_out, ref_grad, what=f"{backend} {point}")
    if point["rollout_is"] != "none":
        assert {"rollout_weight_mean", "rollout_weight_max", "rollout_weight_masked"} <= set(out.metrics)


EDGES = {
    "fully-masked-sequence": dict(mask="random"),  # the first sequence has no valid token
    "one-token-sequences": dict(shape=(4, 1, 129), mask="none"),
    "contiguous": dict(strided=False),
    "per-sequence-advantages": dict(per_sequence_advantages=True),
    "on-policy": dict(with_old=False),
}


EDGE_PARAMS = [  # the Triton interpreter is slow: one edge case per variant there
    (backend, edge, policy_loss) for backend in ALL_BACKENDS for edge in EDGES
    for policy_loss in ("gspo", "cispo", "sapo") if not interpreted(backend) or edge == "fully-masked-sequence"
]


@pytest.mark.parametrize("backend,edge,policy_loss", EDGE_PARAMS)
def test_variant_edges_match_reference(backend, edge, policy_loss, use_backend):
    name = use_backend(backend)
    spec = dict(EDGES[edge])
    shape = spec.pop("shape", (3, 5, 129))
    case = make_case(*shape, seed=7, device=device_for(backend), **spec)
    old = case.old_logprobs if case.old_logprobs is not None else case.ref_logprobs
    options = dict(policy_loss=policy_loss, kl_coef=0.05, rollout_is="truncate", rollout_is_level="sequence",
                   rollout_logprobs=old + 0.1, loss_agg="seq-mean-token-mean")
    ref_out, ref_grad = run_loss(case, "eager", **options)
    out, grad = run_loss(case, name, **options)
    assert_outputs_close(out, grad, ref_out, ref_grad, what=f"{backend} {edge} {policy_loss}")


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo", "sapo"])
@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "rowref"])
def test_variants_bf16_double_baseline(backend, policy_loss, use_backend):
    name = use_backend(backend)
    case = make_case(3, 5, 129, strided=True, seed=11, device=device_for(backend))
    options = dict(policy_loss=policy_loss, kl_coef=0.1, entropy_coef=0.01, rollout_is="truncate",
                   rollout_logprobs=_rollout(case, 11))
    truth, truth_grad = run_loss(case, "eager", logits_dtype=torch.float64, **options)
    eager, eager_grad = run_loss(case, "eager", logits_dtype=torch.bfloat16, **options)
    got, got_grad = run_loss(case, name, logits_dtype=torch.bfloat16, **options)
    pairs = [("loss", got.loss, eager.loss, truth.loss), ("logprobs", got.logprobs, eager.logprobs, truth.logprobs),
             ("grad", got_grad, eager_grad, truth_grad)]
    for what, value, baseline, exact in pairs:
        bound = DOUBLE_BASELINE_FACTOR * max_error(baseline, exact) + DOUBLE_BASELINE_ATOL
        assert max_error(value, exact) <= bound, f"{backend} {policy_loss} {what}"


# ----------------------------------------------------------------------------------
# Hand-computed conventions
# ----------------------------------------------------------------------------------


def _one_token(lp_target: float, old: float, advantage: float, **options):
    """A 2-logit row whose target has log-prob ``lp_target``; returns (loss, d loss / d lp, metrics)."""
    p = math.exp(lp_target)
    logits = torch.tensor([[math.log(p), math.log1p(-p)]], dtype=torch.float64, requires_grad=True)
    out = rf.ppo_loss(logits, torch.tensor([0]), torch.tensor([advantage], dtype=torch.float64),
                      torch.tensor([old], dtype=torch.float64), backend="eager", **options)
    (grad,) = torch.autograd.grad(out.loss, logits)
    # d loss / d logit_0 = g·(1 − p) for a 2-logit row: recover g = d loss / d lp
    return out.loss.item(), grad[0, 0].item() / (1 - p), out.metrics


def test_cispo_by_hand():
    lp, old = math.log(0.5), math.log(0.25)  # r = 2
    loss, g, metrics = _one_token(lp, old, 1.0, policy_loss="cispo", clip_eps=1.0, clip_eps_high=0.5)
    assert loss == pytest.approx(-1.5 * 1.0 * lp)  # weight clamp(2, 0, 1.5) = 1.5, times −A·lp
    assert g == pytest.approx(-1.5)
    assert metrics["clipfrac"].item() == 1.0


def test_sapo_by_hand():
    loss, g, _ = _one_token(math.log(0.5), math.log(0.5), 2.0, policy_loss="sapo", sapo_tau_pos=1.0)
    assert loss == pytest.approx(-(4 / 1.0) * 0.5 * 2.0)  # σ(0) = 1/2 at r = 1
    assert g == pytest.approx(-4 * 0.25 * 1.0 * 2.0)  # −4σ(1−σ)·r·A
    loss, g, _ = _one_token(math.log(0.5), math.log(0.25), -1.0, policy_loss="sapo", sapo_tau_neg=2.0)
    sigma = 1 / (1 + math.exp(-2.0 * (2 - 1)))  # κ = 2 for a negative advantage, r = 2
    assert loss == pytest.approx((4 / 2.0) * sigma)
    assert g == pytest.approx(4 * sigma * (1 - sigma) * 2)


def test_rollout_weights_by_hand():
    logits = torch.zeros(1, 4, 3, requires_grad=True)
    old = torch.full((1, 4), math.log(1 / 3))
    rollout = old - torch.tensor([[math.log(3.0), math.log(1.1), math.log(0.5), 0.0]])  # ρ = 3, 1.1, 0.5, 1
    adv = torch.ones(1, 4)
    base = dict(rollout_logprobs=rollout, rollout_is_min=0.8, rollout_is_max=2.0, backend="eager")
    trunc = rf.ppo_loss(logits, torch.zeros(1, 4, dtype=torch.long), adv, old, rollout_is="truncate", **base)
    masked = rf.ppo_loss(logits, torch.zeros(1, 4, dtype=torch.long), adv, old, rollout_is="mask", **base)
    # pg = −A·r = −1 for every token (r = 1); loss = token mean of −w
    assert trunc.loss.item() == pytest.approx(-(2.0 + 1.1 + 0.8 + 1.0) / 4)
    assert masked.loss.item() == pytest.approx(-(0.0 + 1.1 + 0.0 + 1.0) / 4)
    assert masked.metrics["rollout_weight_masked"].item() == pytest.approx(0.5)
    assert trunc.metrics["rollout_weight_max"].item() == pytest.approx(2.0)
    seq = rf.ppo_loss(logits, torch.zeros(1, 4, dtype=torch.long), adv, old, rollout_is="truncate",
                      rollout_is_level="sequence", **base)
    rho = 3.0 * 1.1 * 0.5 * 1.0  # the product over the sequence: 1.65, inside the bounds
    assert seq.loss.item() == pytest.approx(-rho)


def test_kl_ratio_weighted_and_clamps_by_hand():
    old, ref = math.log(0.25), math.log(0.5) + 1.0  # lp = log 0.5: r = 2, δ = 1
    k3 = math.exp(1.0) - 1.0 - 1.0
    p = 0.5
    logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64, requires_grad=True)
    common = dict(backend="eager", kl_coef=1.0)
    args = (logits, torch.tensor([0]), torch.zeros(1, dtype=torch.float64), torch.tensor([old], dtype=torch.float64),
            torch.tensor([ref], dtype=torch.float64))
    plain = rf.ppo_loss(*args, **common)
    assert plain.loss.item() == pytest.approx(k3)
    weighted = rf.ppo_loss(*args, kl_ratio_weighted=True, **common)
    assert weighted.loss.item() == pytest.approx(2.0 * k3)  # r·k3
    clamped = rf.ppo_loss(*args, kl_clamp=0.5, **common)
    assert clamped.loss.item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(clamped.loss, logits)
    assert grad.abs().max().item() == 0.0  # no gradient where the KL is clamped
    plus = rf.ppo_loss(*args, kl_clamp=0.5, kl_estimator="k3+", **common)
    (grad,) = torch.autograd.grad(plus.loss, logits)
    assert plus.loss.item() == pytest.approx(0.5) and grad[0, 0].item() == pytest.approx(-1.0 * (1 - p))  # k2's
    ratio_clamped = rf.ppo_loss(*args, kl_ratio_weighted=True, log_ratio_clamp=0.5, **common)
    assert ratio_clamped.loss.item() == pytest.approx(math.exp(0.5) * k3)


APPROX_KL_PARAMS = [pytest.param(b, p, c, id=f"{b}-{p}-{c}") for b in ["eager"] + ALL_BACKENDS
                    for p in ("ppo", "gspo", "cispo", "sapo") for c in (None, 0.3, 20.0)
                    if not (interpreted(b) and (p, c) not in (("ppo", 0.3), ("gspo", 20.0)))]


@pytest.mark.parametrize("backend,policy_loss,clamp", APPROX_KL_PARAMS)
def test_approx_kl_uses_the_clamped_log_ratio(backend, policy_loss, clamp, use_backend):
    """approx_kl = mean over valid tokens of (e^c − 1) − c with c = clamp(lp − old, ±log_ratio_clamp), the
    token log-ratio the loss uses, against an fp64 computation written here (log_softmax, gather, clamp),
    for rf.ppo_loss and rf.fused_linear_ppo_loss; log-ratios reach ±25, beyond a clamp of 20."""
    name = use_backend(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(17)
    hidden, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(33, 8, generator=gen)
    logits = hidden @ weight.T
    targets = torch.randint(0, 33, (2, 5), generator=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.2
    lp = torch.log_softmax(logits.double() / 0.9, -1).gather(-1, targets[..., None]).squeeze(-1)
    shift = torch.tensor([0.0, 25.0, -25.0, 0.5, -0.5]).repeat(2, 1).double()  # log-ratios beyond every clamp
    old = (lp - shift + 0.1 * torch.randn(2, 5, generator=gen, dtype=torch.float64)).float()
    adv = torch.randn(2, 5, generator=gen)
    c = lp - old.double()
    if clamp is not None:
        c = c.clamp(-clamp, clamp)
    want = ((torch.expm1(c) - c) * mask).sum() / mask.sum()
    options = dict(policy_loss=policy_loss, log_ratio_clamp=clamp, temperature=0.9, backend=name)
    put = lambda t: t.to(dev)  # noqa: E731
    for path, out in (
        ("ppo_loss", rf.ppo_loss(put(logits), put(targets), put(adv), put(old), mask=put(mask), **options)),
        ("fused_linear_ppo_loss", rf.fused_linear_ppo_loss(put(hidden), put(weight), put(targets), put(adv),
                                                           put(old), mask=put(mask), **options)),
    ):
        got = out.metrics["approx_kl"].cpu().double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, p=path: f"{backend} {policy_loss} clamp {clamp} {p}: {m}")


# ----------------------------------------------------------------------------------
# GSPO against the sequence-level objective, packed against padded
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"])
def test_gspo_equals_the_sequence_level_objective(loss_agg):
    """With one advantage per sequence, the token form equals Σ_b c_b·max(−A_b s_b, −A_b clip(s_b)),
    s_b = exp(mean of the log-ratios), differentiated through the mean (no stop-gradient)."""
    case = make_case(4, 6, 50, seed=3, per_sequence_advantages=True, mask="random", dtype=torch.float64)
    logits = case.logits_base.detach().clone().requires_grad_(True)
    options = dict(policy_loss="gspo", clip_eps=0.1, clip_eps_high=0.15, loss_agg=loss_agg, backend="eager")
    out = rf.ppo_loss(logits, case.targets, case.advantages, case.old_logprobs, mask=case.mask, **options)
    (got,) = torch.autograd.grad(out.loss, logits)

    direct_logits = case.logits_base.detach().clone().requires_grad_(True)
    targets = torch.where(case.mask, case.targets, torch.zeros_like(case.targets))  # padding ids are −100
    lp = torch.log_softmax(direct_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    m = case.mask.to(lp.dtype)
    tokens = m.sum(-1)
    log_s = ((lp - case.old_logprobs) * m).sum(-1) / tokens.clamp_min(1)
    s = torch.exp(log_s)
    adv = case.advantages
    pg = torch.maximum(-adv * s, -adv * s.clamp(0.9, 1.15))
    has = tokens > 0
    batch, seq = case.targets.shape
    if loss_agg == "token-mean":
        coef = tokens / tokens.sum()
    elif loss_agg == "seq-mean-token-sum":
        coef = tokens / has.sum()
    elif loss_agg == "seq-mean-token-mean":
        coef = has.to(lp.dtype) / has.sum()
    else:
        coef = tokens / (batch * seq)
    direct = (coef * pg).sum()
    (want,) = torch.autograd.grad(direct, direct_logits)
    torch.testing.assert_close(out.loss.double(), direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


AGGREGATIONS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PACKED_PARAMS = [  # the Triton interpreter is slow: one aggregation there
    (backend, policy_loss, loss_agg) for backend in ALL_BACKENDS for policy_loss in ("ppo", "gspo")
    for loss_agg in AGGREGATIONS if not interpreted(backend) or loss_agg == "seq-mean-token-mean"
]


@pytest.mark.parametrize("backend,policy_loss,loss_agg", PACKED_PARAMS)
def test_packed_equals_padded(backend, policy_loss, loss_agg, use_backend):
    """verl's remove-padding: the valid tokens of [B, T] packed into [1, N] with cu_seqlens."""
    name = use_backend(backend)
    device = device_for(backend)
    case = make_case(3, 5, 129, seed=21, strided=False, per_sequence_advantages=True, device=device)
    mask = case.mask.clone()
    mask[:, 3:] = False  # right padding: each sequence its first k tokens
    mask[1, 1:] = False
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=device), lengths.cumsum(0)])
    rollout = _rollout(case, 21)
    options = dict(policy_loss=policy_loss, loss_agg=loss_agg, kl_coef=0.1, rollout_is="truncate",
                   rollout_is_level="sequence", norm_length=5)
    padded_logits = case.logits_base.detach().clone().requires_grad_(True)
    padded = rf.ppo_loss(padded_logits, case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                         mask, rollout_logprobs=rollout, backend=name, **options)
    padded.loss.backward()
    packed_logits = case.logits_base.detach()[mask].clone().unsqueeze(0).requires_grad_(True)
    per_token = [t[mask].unsqueeze(0) for t in (case.targets, case.old_logprobs, case.ref_logprobs, rollout)]
    packed = rf.ppo_loss(packed_logits, per_token[0], case.advantages, per_token[1], per_token[2],
                         rollout_logprobs=per_token[3], cu_seqlens=cu, backend=name, **options)
    packed.loss.backward()
    torch.testing.assert_close(packed.loss, padded.loss, **FP32)
    torch.testing.assert_close(packed_logits.grad[0], padded_logits.grad[mask], **FP32)
    torch.testing.assert_close(packed.logprobs[0], padded.logprobs[mask], **FP32)
    for key, value in padded.metrics.items():
        torch.testing.assert_close(packed.metrics[key], value, **FP32, msg=lambda m, k=key: f"{k}: {m}")


# ----------------------------------------------------------------------------------
# gradcheck of the reference, every variant
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy_loss,extra", [
    ("ppo", dict(dual_clip=3.0, kl_ratio_weighted=True, log_ratio_clamp=0.4)),
    ("gspo", dict(rollout_is="truncate", rollout_is_level="sequence")),
    ("cispo", dict(rollout_is="mask", kl_clamp=0.08)),
    ("sapo", dict(kl_estimator="k2", kl_clamp=0.1)),  # k3+ is straight-through: not a derivative
])
def test_reference_gradcheck_every_variant(policy_loss, extra):
    # GSPO's token form is the derivative of its value when the advantage and the weights are constant
    # within a sequence (one advantage per sequence, seq-mean-token-mean, a sequence-level rollout weight)
    case = make_case(2, 4, 7, seed=4, dtype=torch.float64, mask="random",
                     per_sequence_advantages=policy_loss == "gspo")
    rollout = case.old_logprobs + 0.05
    options = dict(policy_loss=policy_loss, kl_coef=0.2, entropy_coef=0.05, loss_agg="seq-mean-token-mean",
                   rollout_logprobs=rollout, rollout_is_min=0.5, rollout_is_max=1.5, backend="eager", **extra)

    old = case.old_logprobs
    if policy_loss == "cispo":
        # CISPO's weight is a stop-gradient: its gradient is the derivative of its value where the weight
        # is constant, i.e. where the clamp is active. Put every ratio near e^-1, below 1 − ε_low.
        old = reference_logprobs(case) + 1.0

    def loss(logits):
        return rf.ppo_loss(logits, case.targets, case.advantages, old, case.ref_logprobs, case.mask, **options).loss

    logits = case.logits_base.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def reference_logprobs(case):
    with torch.no_grad():
        return rf.logprobs(case.logits_base, torch.where(case.mask, case.targets, 0), backend="eager").double()


# ----------------------------------------------------------------------------------
# Bad values
# ----------------------------------------------------------------------------------

BAD = [
    (dict(policy_loss="grpo"), "policy_loss must be one of"),
    (dict(policy_loss="cispo", dual_clip=3.0), "dual_clip applies to policy_loss 'ppo' and 'gspo' only"),
    (dict(policy_loss="sapo", dual_clip=3.0), "dual_clip"),
    (dict(sapo_tau_pos=0.0), "sapo_tau_pos must be a finite number > 0"),
    (dict(rollout_is="truncate"), "needs rollout_logprobs"),
    (dict(rollout_is="clip"), "rollout_is must be one of"),
    (dict(rollout_is="mask", rollout_is_min=3.0, rollout_is_max=2.0), "rollout_is_min (3.0) must be ≤ rollout_is_max"),
    (dict(rollout_is="mask", rollout_is_min=None, rollout_is_max=None), "needs rollout_is_min or rollout_is_max"),
    (dict(rollout_is_level="batch"), "rollout_is_level must be one of"),
    (dict(log_ratio_clamp=-1.0), "log_ratio_clamp must be a finite number > 0"),
    (dict(kl_clamp=0.0), "kl_clamp must be a finite number > 0"),
    (dict(norm_length=0), "norm_length must be a finite number > 0"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_values_raise_value_error(options, message):
    case = make_case(2, 3, 11, seed=1)
    with pytest.raises(ValueError, match=_escape(message)):
        rf.ppo_loss(case.logits(), case.targets, case.advantages, case.old_logprobs, **options)


@pytest.mark.parametrize("cu,message", [
    ([0, 2, 5], "end at the number of tokens N = 6"),
    ([0, 4, 2, 6], "never decrease"),
    ([1, 3, 6], "start at 0"),
])
def test_bad_cu_seqlens(cu, message):
    logits = torch.randn(1, 6, 9)
    with pytest.raises(ValueError, match=_escape(message)):
        rf.ppo_loss(logits, torch.zeros(1, 6, dtype=torch.long), torch.randn(1, 6), policy_loss="gspo",
                    cu_seqlens=torch.tensor(cu))


def test_global_num_sequences_sets_the_sequence_divisor():
    """The sequences of a whole mini-batch split into micro-batches: each seq-* mode divides by it."""
    case = make_case(3, 4, 13, seed=6, dtype=torch.float64)
    common = (case.logits(), case.targets, case.advantages, case.old_logprobs, None, case.mask)
    valid_rows = int(case.mask.any(-1).sum())
    for agg, own in (("seq-mean-token-mean", valid_rows), ("seq-mean-token-sum", valid_rows),
                     ("seq-mean-token-sum-norm", 3)):
        local = rf.ppo_loss(*common, loss_agg=agg, backend="eager").loss
        shared = rf.ppo_loss(*common, loss_agg=agg, global_num_sequences=10, backend="eager").loss
        torch.testing.assert_close(shared, local * own / 10, rtol=1e-12, atol=1e-12)
        as_tensor = rf.ppo_loss(*common, loss_agg=agg, global_num_sequences=torch.tensor(10), backend="eager").loss
        torch.testing.assert_close(as_tensor, shared, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="global_num_sequences applies to the seq-"):
        rf.ppo_loss(*common, global_num_sequences=4, backend="eager")
    with pytest.raises(ValueError, match="global_num_sequences must be a finite number > 0"):
        rf.ppo_loss(*common, loss_agg="seq-mean-token-mean", global_num_sequences=torch.tensor(-1.0))


def test_packed_needs_norm_length_for_dr_grpo():
    logits = torch.randn(1, 6, 9)
    with pytest.raises(ValueError, match="needs norm_length"):
        rf.ppo_loss(logits, torch.zeros(1, 6, dtype=torch.long), torch.randn(1, 6),
                    loss_agg="seq-mean-token-sum-norm", cu_seqlens=torch.tensor([0, 2, 6]))


def test_sequence_options_need_sequences():
    with pytest.raises(ValueError, match="policy_loss='gspo' needs sequences"):
        rf.ppo_loss(torch.randn(6, 9), torch.zeros(6, dtype=torch.long), torch.randn(6), policy_loss="gspo")


def test_a_variant_is_known_by_its_registry_entry(monkeypatch):
    """What the loss layer knows of a variant comes from its POLICY_LOSSES entry, not from its name: a new
    sequence-level variant that takes a dual clip needs sequences, is refused without them under its own name, and
    runs on the statistics path (not the plain PPO kernels), with the values of the variant it delegates to."""
    from rlhf_fast.loss.policy import POLICY_LOSSES, PolicyLoss

    gspo = POLICY_LOSSES.get("gspo")
    monkeypatch.setitem(POLICY_LOSSES._entries, "gspo_twin", PolicyLoss(gspo.compute, True, True, "a copy of gspo"))
    options = rf.LossOptions(policy_loss="gspo_twin", dual_clip=3.0)
    assert options.needs_sequences and not options.is_plain_ppo
    assert rf.LossOptions().is_plain_ppo and not rf.LossOptions().needs_sequences
    with pytest.raises(ValueError, match="policy_loss='gspo_twin' needs sequences"):
        rf.ppo_loss(torch.randn(6, 9), torch.zeros(6, dtype=torch.long), torch.randn(6), options=options)
    with pytest.raises(ValueError, match=_escape("dual_clip applies to policy_loss 'ppo', 'gspo' and 'gspo_twin'")):
        rf.LossOptions(policy_loss="cispo", dual_clip=3.0)
    case = make_case(2, 4, 11, seed=3, dtype=torch.float64)
    args = (case.logits(), case.targets, case.advantages, case.old_logprobs, None, case.mask)
    twin = rf.ppo_loss(*args, options=options, backend="eager")
    want = rf.ppo_loss(*args, policy_loss="gspo", dual_clip=3.0, backend="eager")
    assert torch.equal(twin.loss, want.loss)


@pytest.mark.parametrize("options", [dict(kl_coef=0.1, entropy_coef=0.02),
                                     dict(policy_loss="gspo", loss_agg="seq-mean-token-sum", kl_coef=0.1),
                                     dict(policy_loss="sapo", entropy_coef=0.05, temperature=0.7)])
def test_logprobs_ppo_loss_is_ppo_loss_on_the_logprobs(options):
    """rf.logprobs_ppo_loss on rf.logprobs' differentiable (lp, H) is rf.ppo_loss on the logits: the loss,
    outputs, metrics and d(logits) (eager, fp64, to 1e-12: the same math, in another order of the calls)."""
    case = make_case(2, 5, 13, seed=4, dtype=torch.float64)
    temperature = options.get("temperature", 1.0)
    common = (case.targets, case.advantages, case.old_logprobs, case.ref_logprobs, case.mask)
    want_logits = case.logits()
    want = rf.ppo_loss(want_logits, *common, backend="eager", **options)
    want.loss.backward()
    logits = case.logits()
    lp, entropy = rf.logprobs(logits, case.targets, case.mask, temperature=temperature, with_entropy=True,
                              backend="eager")
    got = rf.logprobs_ppo_loss(lp, entropy, *common, vocab_size=13, **options)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad, want_logits.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-12, atol=1e-12)
    assert got.metrics.keys() == want.metrics.keys()
    for name in want.metrics:
        torch.testing.assert_close(torch.as_tensor(got.metrics[name]), torch.as_tensor(want.metrics[name]),
                                   rtol=1e-12, atol=1e-12, equal_nan=True)


def test_logprobs_ppo_loss_refuses_bad_input():
    lp, entropy = torch.zeros(2, 3), torch.zeros(2, 3)
    targets, advantages = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="vocab_size must be an int > 0"):
        rf.logprobs_ppo_loss(lp, entropy, targets, advantages, vocab_size=0)
    with pytest.raises(ValueError, match="logprobs must be a floating-point torch.Tensor"):
        rf.logprobs_ppo_loss(targets, entropy, targets, advantages, vocab_size=5)
    with pytest.raises(ValueError, match=_escape("entropy shape (3,) must match logprobs shape (2, 3)")):
        rf.logprobs_ppo_loss(lp, entropy[0], targets, advantages, vocab_size=5)
    with pytest.raises(ValueError, match=_escape("targets has ids outside [0, 5)")):
        rf.logprobs_ppo_loss(lp, entropy, targets + 5, advantages, vocab_size=5)
    with pytest.raises(ValueError, match=_escape("advantages shape (3,) must be (2, 3)")):
        rf.logprobs_ppo_loss(lp, entropy, targets, advantages[0], vocab_size=5)
    with pytest.raises(TypeError, match="logprobs_ppo_loss.. got unexpected keyword"):
        rf.logprobs_ppo_loss(lp, entropy, targets, advantages, vocab_size=5, clip=0.2)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# ----------------------------------------------------------------------------------
# The module and the options object
# ----------------------------------------------------------------------------------


def test_module_takes_every_option_and_per_call_tensors():
    case = make_case(2, 4, 13, seed=2)
    rollout = case.old_logprobs + 0.1
    loss_fn = rf.PPOLoss(policy_loss="gspo", rollout_is="truncate", kl_coef=0.1, backend="eager")
    out = loss_fn(case.logits(), case.targets, case.advantages, case.old_logprobs, case.ref_logprobs, case.mask,
                  rollout_logprobs=rollout)
    want = rf.ppo_loss(case.logits(), case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                       case.mask, rollout_logprobs=rollout, policy_loss="gspo", rollout_is="truncate", kl_coef=0.1,
                       backend="eager")
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    options = rf.LossOptions(policy_loss="cispo", clip_eps=1.0, clip_eps_high=4.0)
    via_object = rf.ppo_loss(case.logits(), case.targets, case.advantages, case.old_logprobs, mask=case.mask,
                             options=options, backend="eager")
    via_keywords = rf.ppo_loss(case.logits(), case.targets, case.advantages, case.old_logprobs, mask=case.mask,
                               policy_loss="cispo", clip_eps=1.0, clip_eps_high=4.0, backend="eager")
    torch.testing.assert_close(via_object.loss, via_keywords.loss, rtol=0, atol=0)


def test_every_grid_axis_is_covered():
    """The pairwise cover meets every pair of values of the grid's axes."""
    for (a, va), (b, vb) in itertools.combinations(AXES.items(), 2):
        seen = {(p[a], p[b]) for p in COVER}
        assert seen == set(itertools.product(va, vb)), (a, b)
