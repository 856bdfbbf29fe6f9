"""Property-based checks of every backend (hypothesis, derandomised and bounded).

Each property draws shapes, dtypes, options, masks and values, runs the public API
(``rf.ppo_loss`` + backward, ``rf.logprobs``) on one backend and checks it against the
eager reference and against the fp64 truth (the eager reference on the same inputs
upcast to fp64), with the tolerances of ``helpers.TOLERANCES`` and the double baseline:

* agreement: every fused backend equals the eager reference to the fp32 tolerances, and
  meets the double baseline in bf16 / fp16, over every option of the loss;
* large offsets: logits shifted by up to 1e4 (fp32) or 6e4 (fp16) still give exact
  log-probs, entropies, losses and gradients (every backend, eager included, against
  the fp64 truth); rows with one huge logit;
* finite inputs give finite outputs wherever the math is finite: ratios that overflow
  ``exp`` (log-ratio ±100, ±200) with zero, clipped and dual-clipped advantages, k3 / k3+
  at δ = ±100 (with β = 0 too), rows whose max jumps by 2e36 between vocabulary blocks,
  banned (−inf) tokens, and masked rows whose logits are anything at all (−inf, NaN,
  ±1e38), which get an exact zero gradient;
* NaN inputs at a valid position (a logit, an advantage, an old or reference log-prob, with
  β = 0 too) make the loss NaN, a +inf logit makes it non-finite; junk at masked positions
  changes nothing.

"The math is finite" is judged by the fp64 truth: a value whose fp64 truth exceeds the
fp32 range (e.g. a loss of −A·e^100 for an unclipped negative advantage) may overflow.

Examples are seeded from the test's name (``derandomize=True``); the Triton interpreter
runs fewer and smaller examples than the other backends.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from conftest import HAS_CPP, HAS_TRITON, device_for, interpreted
from helpers import (
    DOUBLE_BASELINE_ATOL,
    DOUBLE_BASELINE_FACTOR,
    TOLERANCES,
    Case,
    assert_double_baseline,
    assert_outputs_close,
    max_error,
    outputs_dict,
    run_loss,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlhf_fast as rf

BACKENDS = ["eager"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])
FUSED = [b for b in BACKENDS if b != "eager"]
FP32 = TOLERANCES[torch.float32]
FP32_MAX = torch.finfo(torch.float32).max
LOW_PRECISION = [torch.bfloat16, torch.float16]
KL_ESTIMATORS = ["k1", "k2", "k3", "k3+"]
LOSS_AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
# 2049 spans two of the C++ kernels' 2048-logit blocks and two Triton fp32 blocks.
VOCABS = [1, 2, 7, 64, 129, 300, 2049]
INTERPRETER_VOCABS = [1, 2, 7, 64, 129]


def check(backend: str, examples: int, interpreter_examples: int):
    """Hypothesis settings: derandomised, bounded, fewer examples under the Triton interpreter."""
    return settings(
        max_examples=interpreter_examples if interpreted(backend) else examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------------------
# Drawing cases
# ---------------------------------------------------------------------------------------


def draw_options(data, *, has_ref: bool, temperature: Optional[float] = None, loss_agg: Optional[str] = None):
    """Loss options: clip (symmetric or not), dual clip, KL estimator and β, η, τ, aggregation."""
    agg = loss_agg or data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    options = dict(
        clip_eps=data.draw(st.sampled_from([0.1, 0.2, 0.3]), label="clip_eps"),
        clip_eps_high=data.draw(st.sampled_from([None, 0.28, 0.5]), label="clip_eps_high"),
        dual_clip=data.draw(st.sampled_from([None, 1.5, 3.0]), label="dual_clip"),
        kl_estimator=data.draw(st.sampled_from(KL_ESTIMATORS), label="kl_estimator"),
        kl_coef=data.draw(st.sampled_from([0.0, 0.05, 0.5]), label="kl_coef") if has_ref else 0.0,
        entropy_coef=data.draw(st.sampled_from([0.0, 0.01, 0.1]), label="entropy_coef"),
        temperature=temperature or data.draw(st.sampled_from([1.0, 0.7, 1.5]), label="temperature"),
        loss_agg=agg,
    )
    if agg == "token-mean":
        gnt = data.draw(st.sampled_from([None, 11, "tensor"]), label="global_num_tokens")
        options["global_num_tokens"] = torch.tensor(11.0) if gnt == "tensor" else gnt
    return options


def draw_mask(data, gen: torch.Generator, batch: int, seq: int, *, need_valid: bool = False):
    """None, random, whole sequences masked, everything masked, or a {0, 1} int mask."""
    kinds = ["none", "random", "rows", "int"] + ([] if need_valid else ["all"])
    kind = data.draw(st.sampled_from(kinds), label="mask")
    if kind == "none":
        return None
    m = torch.rand(batch, seq, generator=gen) > 0.3
    if kind == "rows":
        m[torch.rand(batch, generator=gen) < 0.5] = False
    elif kind == "all":
        m[:] = False
    if need_valid and seq > 0:
        m[0, 0] = True
    return m.long() if kind == "int" else m


def valid_of(mask: Optional[torch.Tensor], batch: int, seq: int) -> torch.Tensor:
    return torch.ones(batch, seq, dtype=torch.bool) if mask is None else mask != 0


def truth_logprobs(x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp64 log-probs of the (clamped-to-range) targets, to place old / ref near the policy."""
    lsm = torch.log_softmax(x.double() / temperature, -1)
    return lsm.gather(-1, targets.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)


def draw_case(data, backend: str, *, dtype=torch.float32, offset: float = 0.0, extreme: bool = False,
              need_valid: bool = False, temperature: Optional[float] = None):
    """(Case, options) with logits [B, T(+1), V] and every per-token input.

    ``offset`` shifts every logit; ``extreme`` adds the overflow cases of the
    finite-in/finite-out property (see the module docstring).
    """
    batch = data.draw(st.integers(1, 3), label="batch")
    seq = data.draw(st.integers(1 if need_valid else 0, 4), label="seq")
    vocab = data.draw(st.sampled_from(INTERPRETER_VOCABS if interpreted(backend) else VOCABS), label="vocab")
    strided = data.draw(st.booleans(), label="strided")
    # one sequence's logits scored for every sequence: an expanded, stride-0 view
    expanded = batch > 1 and data.draw(st.booleans(), label="expanded")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scale = data.draw(st.sampled_from([0.5, 2.0, 8.0]), label="scale")
    base = torch.randn(1 if expanded else batch, seq + int(strided), vocab, generator=gen) * scale
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    view = base[:, :seq]  # [B or 1, T, V]: what the sequences read
    if vocab > 2 and data.draw(st.booleans(), label="banned"):
        banned = torch.rand(view.shape, generator=gen) < 0.2
        for row_targets in targets if expanded else [targets]:
            banned.scatter_(-1, row_targets.expand(view.shape[:2]).unsqueeze(-1), False)  # never a target
        view.masked_fill_(banned, float("-inf"))
    if vocab > 2 and seq > 0 and data.draw(st.booleans(), label="confident"):
        # confident targets (1 − p_y from 1e-3 down to 1e-6): 1 − p_y must not cancel, and large advantages
        # (drawn below) carry its digits into the gradient
        rows = torch.rand(view.shape[:2], generator=gen) < 0.6
        bump = data.draw(st.sampled_from([8.0, 10.0, 14.0]), label="confident_bump")
        col = targets[:1] if expanded else targets
        view.add_(torch.zeros_like(view).scatter_(-1, col.unsqueeze(-1), bump * scale) * rows.unsqueeze(-1))
    if vocab > 1 and seq > 0 and not expanded and data.draw(st.booleans(), label="huge_logit"):
        # one huge logit in each of some rows, on the target (lp ≈ 0) or next to it (lp ≈ −huge)
        rows = torch.rand(batch, seq, generator=gen) < 0.5
        headroom = torch.finfo(dtype).max - abs(offset) - 100.0  # stay finite in fp16
        huge = data.draw(st.sampled_from([h for h in (30.0, 1e3, 1e4) if h < headroom]), label="huge")
        # Off the target only at 30: a log-prob near −1e4 has an fp32 ulp of 1e-3, which any
        # backend's ratio exp(lp − old) legitimately amplifies (rf.logprobs tests it alone).
        on_target = extreme or huge > 30.0 or data.draw(st.booleans(), label="huge_on_target")
        col = targets if on_target else (targets + 1) % vocab
        bump = torch.zeros_like(view).scatter_(-1, col.unsqueeze(-1), huge) * rows.unsqueeze(-1)
        view.add_(bump)
    if extreme and vocab > 2048 and seq > 0 and not expanded and data.draw(st.booleans(), label="max_jump"):
        # the row max jumps from −1e36 to 1e36 at the first block boundary; the target sits
        # among the top logits (a moderate log-prob, so the ratio math stays comparable)
        view[0, 0, :2048] = -1e36
        view[0, 0, 2048:] = 1e36
        targets[0, 0] = vocab - 1
    if offset:
        view.add_(offset)
    mask = draw_mask(data, gen, batch, seq, need_valid=need_valid)
    valid = valid_of(mask, batch, seq)
    unread = ~valid.any(0, keepdim=True) if expanded else ~valid  # logit rows no valid token reads
    if extreme and seq > 0 and unread.any():
        junk = data.draw(st.sampled_from([float("-inf"), float("nan"), float("inf"), 1e38, -1e38]),
                         label="masked_logits")
        view[unread] = junk  # masked rows: anything at all
    targets = torch.where(valid, targets, torch.full_like(targets, -100))  # padding ids where masked

    options = draw_options(data, has_ref=True, temperature=temperature)
    tau = options["temperature"]
    lp = truth_logprobs(view.expand(batch, seq, vocab).to(dtype), targets, tau)
    lp = torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))
    per_seq = data.draw(st.booleans(), label="per_sequence_advantages")
    adv = torch.randn((batch,) if per_seq else (batch, seq), generator=gen)
    if dtype == torch.float32:  # the double baseline's 1e-6 floor is for advantages of order 1
        adv = adv * data.draw(st.sampled_from([1.0, 1.0, 1e3, 1e6]), label="advantage_scale")
    if data.draw(st.booleans(), label="zero_advantages"):
        adv = torch.where(torch.rand(adv.shape, generator=gen) < 0.4, torch.zeros_like(adv), adv)
    elif extreme:  # |A| ≥ 0.1: −A·e^100 then overflows in fp64's fp32 range too
        adv = torch.where(adv.abs() < 0.1, torch.full_like(adv, 0.5), adv)
    with_old = extreme or data.draw(st.booleans(), label="with_old")  # on-policy: r = 1, nothing overflows
    with_ref = data.draw(st.booleans(), label="with_ref")
    # Around e^88.7 = FLT_MAX a token's −A·r or β·e^δ overflows while its weighed share, the loss and the
    # means may not; ±100 and ±200 overflow for good.
    edges = [0.0, 86.0, 88.5, 89.0, 90.0, 95.0, 100.0, -100.0, 200.0, -200.0]
    shifts = [0.0]
    if extreme:
        shifts = data.draw(st.lists(st.sampled_from(edges), min_size=1, max_size=3), label="log_ratio_shifts")
    pick = torch.randint(0, len(shifts), (batch, seq), generator=gen)
    shift = torch.tensor(shifts, dtype=torch.float64)[pick]
    old = (lp + 0.3 * torch.randn(lp.shape, generator=gen, dtype=torch.float64) - shift).float()
    deltas = [0.0]
    if extreme:
        deltas = data.draw(st.lists(st.sampled_from(edges), min_size=1, max_size=3), label="kl_deltas")
    pick = torch.randint(0, len(deltas), (batch, seq), generator=gen)
    ref = (lp + 0.3 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)
           + torch.tensor(deltas, dtype=torch.float64)[pick]).float()
    if not with_ref:
        options["kl_coef"] = 0.0
    if not expanded and data.draw(st.booleans(), label="inplace_backward"):
        options["inplace_backward"] = True
    case = Case(base.to(dtype).requires_grad_(True), targets, adv, old if with_old else None,
                ref if with_ref else None, mask, strided, batch if expanded else 0)
    return case, options


def on(case: Case, backend: str) -> Case:
    """The case (built on the CPU, where the references run) on the backend's device."""
    dev = device_for(backend)

    def put(t):
        return None if t is None else t.to(dev)

    return Case(case.logits_base.detach().to(dev).requires_grad_(True), put(case.targets), put(case.advantages),
                put(case.old_logprobs), put(case.ref_logprobs), put(case.mask), case.strided, case.expand)


def run_on(case: Case, backend: str, **options):
    """``run_loss`` on the backend's device; outputs and gradient brought back to the CPU."""
    out, grad = run_loss(on(case, backend), backend, **options)
    out = out._replace(loss=out.loss.detach().cpu(), logprobs=out.logprobs.cpu(), entropy=out.entropy.cpu(),
                       metrics={k: v.cpu() for k, v in out.metrics.items()})
    return out, grad


def truth_of(case: Case, options):
    """The fp64 truth: the eager reference on the same inputs upcast to fp64."""
    options = {k: v for k, v in options.items() if k != "inplace_backward"}
    return run_loss(case, "eager", logits_dtype=torch.float64, **options)


def eager_of(case: Case, options):
    options = {k: v for k, v in options.items() if k != "inplace_backward"}
    return run_loss(case, "eager", **options)


def masked_rows(case: Case) -> torch.Tensor:
    """[B, T(+1)] bool: rows of logits_base that no valid token reads."""
    valid = valid_of(case.mask, *case.targets.shape).to(case.logits_base.device)
    if case.expand:
        valid = valid.any(0, keepdim=True)  # one row of logits_base, read by every sequence
    rows = torch.ones(case.logits_base.shape[:2], dtype=torch.bool, device=valid.device)
    rows[:, : valid.shape[1]] = ~valid
    return rows


def assert_close_to_truth(out, grad, truth_out, truth_grad, what: str) -> None:
    """fp32 results vs the fp64 truth, with the fp32 tolerances (loss, per-token outputs, metrics, gradient)."""
    pairs = {"loss": (out.loss, truth_out.loss), "logprobs": (out.logprobs, truth_out.logprobs),
             "entropy": (out.entropy, truth_out.entropy), "d(logits)": (grad, truth_grad)}
    pairs.update({f"metric {k}": (v, truth_out.metrics[k]) for k, v in out.metrics.items()})
    for name, (got, want) in pairs.items():
        torch.testing.assert_close(got.cpu().double(), want, **FP32, msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_double_baseline_on(case: Case, options, backend: str) -> None:
    """bf16 / fp16 logits: the backend's gradient in their dtype, and its error vs the fp64 truth ≤ 2× the
    eager reference's own + 1e-6 (loss, per-token outputs, metrics, gradient)."""
    dtype = case.logits_base.dtype
    truth = outputs_dict(*truth_of(case, options))
    eager = outputs_dict(*eager_of(case, options))
    out, grad = run_on(case, backend, **options)
    assert grad.dtype == dtype
    assert_double_baseline(outputs_dict(out, grad), eager, truth, what=f"{backend} {dtype} {options}")


# ---------------------------------------------------------------------------------------
# Agreement with the eager reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_matches_eager_fp32(backend, triton_env):
    """Random shapes, masks and options: fp32 outputs, metrics, gradients ≈ eager (fp32 tolerances)."""

    @check(backend, 120, 20)
    @given(st.data())
    def prop(data):
        case, options = draw_case(data, backend)
        ref_out, ref_grad = eager_of(case, options)
        out, grad = run_on(case, backend, **options)
        assert_outputs_close(out, grad, ref_out, ref_grad, what=f"{backend} {options}")

    prop()


# Offsets of the low-precision property: (examples, examples under the interpreter, offsets per dtype); near
# the dtype's limit, x − max stays exact where x − (max + log s) would lose |max|·ulp.
DOUBLE_BASELINE_OFFSETS = {
    "moderate": (50, 8, {torch.bfloat16: [0.0], torch.float16: [0.0]}),
    "large": (40, 8, {torch.bfloat16: [-1e4, -1e3, 1e3, 1e4], torch.float16: [-6e4, -1e3, 1e3, 6e4]}),
}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("offsets", DOUBLE_BASELINE_OFFSETS)
def test_fused_backend_low_precision_double_baseline(backend, dtype, offsets, triton_env):
    """bf16 / fp16 logits, also near ±6e4 (fp16) and ±1e4 (bf16): error vs the fp64 truth ≤ 2× the eager
    reference's own + 1e-6."""
    examples, interpreter_examples, offsets_of = DOUBLE_BASELINE_OFFSETS[offsets]

    @check(backend, examples, interpreter_examples)
    @given(st.data())
    def prop(data):
        offset = data.draw(st.sampled_from(offsets_of[dtype]), label="offset")
        assert_double_baseline_on(*draw_case(data, backend, dtype=dtype, offset=offset), backend)

    prop()


# ---------------------------------------------------------------------------------------
# Large offsets: exact log-probs on every backend
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offsets_fp32_match_fp64_truth(backend, triton_env):
    """fp32 logits + offset (|offset| ≤ 1e4, τ = 1): loss, per-token outputs, metrics, gradient ≈ fp64 truth.

    x − max is exact at any offset, so a backend that subtracts the row max first loses
    nothing; one that forms x − (max + log s) loses |max|·ulp.
    """

    @check(backend, 60, 12)
    @given(st.data())
    def prop(data):
        offset = data.draw(st.sampled_from([-1e4, -1e3, 1e2, 1e3, 1e4]), label="offset")
        case, options = draw_case(data, backend, offset=offset, temperature=1.0)
        truth_out, truth_grad = truth_of(case, options)
        out, grad = run_on(case, backend, **options)
        assert_close_to_truth(out, grad, truth_out, truth_grad, what=f"{backend} offset {offset} {options}")

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_match_fp64_truth(backend, triton_env):
    """``rf.logprobs`` (with entropy): fp32 tolerances vs the fp64 truth, offsets and huge logits included."""

    @check(backend, 80, 16)
    @given(st.data())
    def prop(data):
        offset = data.draw(st.sampled_from([0.0, 0.0, -1e4, 1e4, 1e30]), label="offset")
        tau = 1.0 if offset else data.draw(st.sampled_from([1.0, 0.7]), label="temperature")
        case, _ = draw_case(data, backend, offset=offset if abs(offset) <= 1e4 else 0.0, temperature=tau)
        logits = case.logits().detach()
        if offset == 1e30:
            # every logit 1e30 + k·ulp(1e30) (k a small integer): x − max is exact, while
            # max + log s rounds log s away entirely
            ulp = 2.0**76
            logits = torch.where(torch.isfinite(logits), 1e30 + logits.round().clamp(-8, 8) * ulp, logits)
        targets, mask = case.targets, case.mask
        lp, entropy = rf.logprobs(logits.to(device_for(backend)), targets.to(device_for(backend)),
                                  None if mask is None else mask.to(device_for(backend)),
                                  temperature=tau, with_entropy=True, backend=backend)
        want_lp, want_h = rf.logprobs(logits.double(), targets, mask, temperature=tau, with_entropy=True,
                                      backend="eager")
        torch.testing.assert_close(lp.cpu().double(), want_lp, **FP32, msg=lambda m: f"{backend} logprobs: {m}")
        torch.testing.assert_close(entropy.cpu().double(), want_h, **FP32, msg=lambda m: f"{backend} entropy: {m}")

    prop()


# ---------------------------------------------------------------------------------------
# Finite in, finite out; NaN propagates
# ---------------------------------------------------------------------------------------


def representable(value: torch.Tensor) -> torch.Tensor:
    """Where an fp64 truth is finite and inside the fp32 range."""
    return torch.isfinite(value) & (value.abs() <= FP32_MAX)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_inputs_give_finite_outputs(backend, triton_env):
    """Overflowing ratios and KL, max jumps, huge logits, junk in masked rows.

    Masked rows get an exact zero gradient and per-token outputs 0. Wherever the fp64
    truth of the loss is finite and fits fp32: the loss, per-token outputs, metrics (those
    whose truth fits fp32) and the whole gradient are finite, and (at τ = 1) as close to the
    truth as the fp32 tolerances, or the eager reference's own error, allow: every backend
    gives the same answer at the edges.
    """

    @check(backend, 120, 20)
    @given(st.data())
    def prop(data):
        case, options = draw_case(data, backend, extreme=True)
        truth_out, truth_grad = truth_of(case, options)
        out, grad = run_on(case, backend, **options)
        what = f"{backend} {options}"
        dead = masked_rows(case)
        assert (grad[dead] == 0).all(), f"{what}: masked rows got a non-zero gradient"
        valid = valid_of(case.mask, *case.targets.shape)
        assert (out.logprobs[~valid] == 0).all() and (out.entropy[~valid] == 0).all(), what
        if not representable(truth_out.loss):
            return  # the math itself leaves the fp32 range (e.g. −A·e^100, β·e^100)
        assert torch.isfinite(out.loss), f"{what}: loss {out.loss} (truth {truth_out.loss})"
        assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all(), what
        for name, value in out.metrics.items():
            if representable(truth_out.metrics[name]):
                assert torch.isfinite(value), f"{what}: metric {name} = {value} (truth {truth_out.metrics[name]})"
        assert torch.isfinite(grad).all(), f"{what}: non-finite gradient"
        if options["temperature"] != 1.0:
            return  # fp32 rounding of x = logits / τ differs from the truth's at 1e36
        eager_out, eager_grad = eager_of(case, options)
        live = ~dead
        truth_grad = truth_grad.clone()
        truth_grad[dead] = 0.0  # exact zeros by the contract (the fp64 reference is not under test here)
        got, eager, truth = outputs_dict(out, grad[live]), outputs_dict(eager_out, eager_grad[live]), \
            outputs_dict(truth_out, truth_grad[live])
        for name, want in truth.items():
            if name.startswith("metric:") and not representable(want):
                continue
            assert_as_accurate_as_eager(got[name], eager[name], want, f"{what} {name}")

    prop()


def assert_as_accurate_as_eager(got: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """fp32 result vs the fp64 truth: within the fp32 tolerances, or (for quantities that cancel,
    e.g. the mean of k1 = lp − ref) no worse than the double baseline of the eager reference's own
    fp32 error, when that error is finite."""
    got = got.detach().cpu().double()
    if torch.allclose(got, truth, **FP32):
        return
    err = max_error(got, truth)
    eager_err = max_error(eager, truth)
    bound = DOUBLE_BASELINE_FACTOR * eager_err + DOUBLE_BASELINE_ATOL
    assert math.isfinite(eager_err) and err <= bound, f"{what}: error {err:.3g} vs fp64 truth, eager's {eager_err:.3g}"


NAN_PLACES = ["logit", "inf_logit", "advantage", "old_logprob", "ref_logprob"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_a_valid_position_propagates_to_the_loss(backend, triton_env):
    """NaN in a logit, an advantage, an old or a reference log-prob at a valid token: NaN loss;
    a +inf logit: a non-finite loss (nothing is silently masked).

    Drawn with zero advantages, clipped ratios, dual clip and β = 0 too, where a NaN-dropping
    max / min, a zero-advantage shortcut or skipping the β·kl term would hide it.
    """

    @check(backend, 80, 16)
    @given(st.data())
    def prop(data):
        case, options = draw_case(data, backend, need_valid=True)
        place = data.draw(st.sampled_from(NAN_PLACES), label="nan_in")
        valid = valid_of(case.mask, *case.targets.shape)
        b, t = [int(i) for i in valid.nonzero()[data.draw(st.integers(0, int(valid.sum()) - 1), label="pos")]]
        nan = float("nan")
        if place in ("logit", "inf_logit"):
            col = data.draw(st.integers(0, case.logits_base.shape[-1] - 1), label="col")
            with torch.no_grad():  # expanded: the one row of logits every sequence reads at t
                case.logits_base[0 if case.expand else b, t, col] = nan if place == "logit" else float("inf")
        elif place == "advantage":
            adv = case.advantages.clone()
            adv[(b,) if adv.dim() == 1 else (b, t)] = nan  # per-sequence advantages: the whole sequence
            case.advantages = adv
        elif place == "old_logprob":
            old = torch.zeros(case.targets.shape) if case.old_logprobs is None else case.old_logprobs.clone()
            old[b, t] = nan
            case.old_logprobs = old
        else:
            ref = torch.zeros(case.targets.shape) if case.ref_logprobs is None else case.ref_logprobs.clone()
            ref[b, t] = nan
            case.ref_logprobs = ref
            options["kl_coef"] = data.draw(st.sampled_from([0.0, 0.1]), label="kl_coef_with_nan")
        out, _ = run_on(case, backend, **options)
        if place == "inf_logit":
            assert not torch.isfinite(out.loss), f"{backend}: +inf logit at valid ({b}, {t}) gave loss {out.loss}"
            return
        assert torch.isnan(out.loss), f"{backend}: NaN {place} at valid ({b}, {t}) gave loss {out.loss} {options}"
        if place == "logit":
            lp = rf.logprobs(case.logits().detach().to(device_for(backend)), case.targets.to(device_for(backend)),
                             None if case.mask is None else case.mask.to(device_for(backend)),
                             temperature=options["temperature"], backend=backend).cpu()
            assert torch.isnan(lp[b, t]), f"{backend}: NaN logit gave log-prob {lp[b, t]}"
            others = valid.clone()
            if case.expand:
                others[:, t] = False  # every sequence reads that row
            others[b, t] = False
            assert torch.isfinite(lp[others]).all(), f"{backend}: a NaN logit leaked into other rows"

    prop()

