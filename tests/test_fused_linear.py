"""Fused-linear PPO loss vs the eager reference applied to ``hidden @ weight.T (+ bias)``.

The truth is ``rf.ppo_loss(logits, ..., backend="eager")`` differentiated by autograd back
to hidden, weight and bias. fp32 uses the contract's tolerances of ``helpers.TOLERANCES``
unchanged (the chunked matmuls sum in a different order than one big GEMM, but at these
sizes the difference stays far inside rtol 1e-5 / atol 1e-6, so nothing is loosened);
bf16 uses the double baseline against fp64 truth.

Row backends: ``"eager"`` (the closed-form reference row ops, always), ``"cpp"`` when the
extension is built, ``"triton"`` on CUDA or through the interpreter (a few cases only).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import pytest
import torch
from conftest import HAS_CPP, HAS_TRITON, device_for, grid_params, interpreted
from helpers import (
    DOUBLE_BASELINE_ATOL,
    DOUBLE_BASELINE_FACTOR,
    LOSS_AXES,
    TOLERANCES,
    max_error,
    pairwise_cover,
    policy_inputs,
)

import rlhf_fast as rf
from rlhf_fast import backends
from rlhf_fast.loss.fused_linear import default_chunk_size
from rlhf_fast.loss.reference import REFERENCE_OPS

FP32 = TOLERANCES[torch.float32]
ROW_BACKENDS = ["eager"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])
FAST_ROW_BACKENDS = [b for b in ROW_BACKENDS if not interpreted(b)]


class LinearCase(NamedTuple):
    hidden: torch.Tensor  # [B, T, H] (or [N, H] when flat)
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V]
    targets: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T] or [B]
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


def make_linear_case(
    batch: int = 3,
    seq: int = 37,
    hidden_size: int = 16,
    vocab: int = 129,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    bias: bool = True,
    mask: str = "random",  # "none" | "random" | "chunk-masked" | "all-masked"
    with_old: bool = True,
    with_ref: bool = True,
    per_sequence_advantages: bool = False,
    banned_tokens: int = 0,
    device: str = "cpu",
) -> LinearCase:
    """Logits of std ≈ 2 (like helpers.make_case); old/ref near the current policy."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (1.5 / hidden_size**0.5)
    b = torch.randn(vocab, generator=gen) if bias or banned_tokens else None
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    if banned_tokens:  # −inf logits through the bias, never on a target
        banned = torch.tensor([v for v in torch.randperm(vocab, generator=gen).tolist()
                               if not (targets == v).any()][:banned_tokens])
        b[banned] = float("-inf")
    h, w = hidden.to(dtype).float(), weight.to(dtype).float()
    logits = h @ w.T + (b.to(dtype).float() if b is not None else 0.0)
    old, ref, advantages = policy_inputs(logits, targets, gen, with_old=with_old, with_ref=with_ref,
                                         per_sequence_advantages=per_sequence_advantages)
    if mask == "none":
        m = None
    elif mask in ("random", "chunk-masked"):
        m = torch.rand(batch, seq, generator=gen) > 0.25
        m[0] = False  # a fully masked sequence
        m[1, 0] = True
        if mask == "chunk-masked":  # flattened rows 16..31: one whole chunk of 16
            m.view(-1)[16:32] = False
        targets = torch.where(m, targets, torch.full_like(targets, -100))  # padding ids
    elif mask == "all-masked":
        m = torch.zeros(batch, seq, dtype=torch.bool)
    else:
        raise ValueError(mask)

    def put(t, cast=False):
        if t is None:
            return None
        return t.to(dtype).to(device) if cast else t.to(device)

    return LinearCase(put(hidden, True), put(weight, True), put(b, True), put(targets), put(advantages),
                      put(old), put(ref), put(m))


def _leaves(case: LinearCase, dtype=None, grads=(True, True, True)):
    out = []
    for t, g in zip((case.hidden, case.weight, case.bias), grads, strict=True):
        if t is None:
            out.append(None)
            continue
        t = t.detach().clone()
        if dtype is not None:
            t = t.to(dtype)
        out.append(t.requires_grad_(g))
    return out


def _grads(*tensors) -> Dict[str, Optional[torch.Tensor]]:
    names = ("hidden", "weight", "bias")
    return {n: (None if t is None else t.grad) for n, t in zip(names, tensors, strict=True)}


def run_eager(case: LinearCase, dtype=None, **options):
    """The truth: full logits, then the eager reference loss, autograd to the inputs."""
    hidden, weight, bias = _leaves(case, dtype)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    out = rf.ppo_loss(logits, case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                      case.mask, backend="eager", **options)
    out.loss.backward()
    return out, _grads(hidden, weight, bias)


def run_fused(case: LinearCase, backend="eager", dtype=None, grads=(True, True, True), **options):
    hidden, weight, bias = _leaves(case, dtype, grads)
    out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, case.old_logprobs,
                                   case.ref_logprobs, case.mask, bias=bias, backend=backend, **options)
    if out.loss.requires_grad:
        out.loss.backward()
    return out, _grads(hidden, weight, bias)


def assert_close_to_eager(out, grads, ref_out, ref_grads, what=""):
    tol = FP32
    torch.testing.assert_close(out.loss, ref_out.loss, **tol, msg=lambda m: f"{what} loss: {m}")
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    for name in ("logprobs", "entropy"):
        got, want = getattr(out, name), getattr(ref_out, name)
        assert got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{what} {n}: {m}")
    assert set(out.metrics) == set(ref_out.metrics)
    for name, value in out.metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0, name
        torch.testing.assert_close(value, ref_out.metrics[name], **tol, msg=lambda m, n=name: f"{what} {n}: {m}")
    for name, want in ref_grads.items():
        got = grads[name]
        if want is None:
            assert got is None, f"{what} d{name} should be None"
            continue
        assert got is not None and got.dtype == want.dtype and got.shape == want.shape, f"{what} d{name}"
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{what} d{n}: {m}")


# ----------------------------------------------------------------------------------
# Every option of the contract's API, pairwise, on every row backend.
# ----------------------------------------------------------------------------------

AXES = {
    **LOSS_AXES,
    "bias": [True, False],
    "mask": ["random", "chunk-masked", "none"],
    "with_old": [True, False],
    "with_ref": [True, False],
}
COVER = pairwise_cover(AXES)
CASE_KEYS = ("bias", "mask", "with_old", "with_ref")


@pytest.mark.parametrize("backend,options,seed", grid_params(ROW_BACKENDS, COVER, COVER[:4]))
def test_options_match_eager(backend, options, seed, triton_env):
    case_kwargs = {k: options[k] for k in CASE_KEYS}
    loss_kwargs = {k: v for k, v in options.items() if k not in CASE_KEYS}
    loss_kwargs["kl_coef"] = 0.1 if options["with_ref"] else 0.0
    # N = 111 rows in chunks of 16: six full chunks and a last one of 15.
    case = make_linear_case(seed=seed, device=device_for(backend), **case_kwargs)
    ref_out, ref_grads = run_eager(case, **loss_kwargs)
    out, grads = run_fused(case, backend, chunk_size=16, **loss_kwargs)
    assert_close_to_eager(out, grads, ref_out, ref_grads, what=f"{backend} {options}")


EDGE_CASES = {
    "V=1000-default-chunk": dict(shape=(2, 9, 24, 1000)),
    "V=50257": dict(shape=(2, 5, 8, 50257), chunk_size=3),
    "chunk=1": dict(chunk_size=1),
    "chunk=7": dict(chunk_size=7),
    "chunk>N": dict(chunk_size=500),
    "chunk=N": dict(chunk_size=111),
    "one-token": dict(shape=(1, 1, 16, 129), mask="none"),
    "all-masked": dict(mask="all-masked"),
    "per-sequence-advantages": dict(per_sequence_advantages=True, loss_agg="seq-mean-token-mean"),
    "global-num-tokens-int": dict(global_num_tokens=500),
    "global-num-tokens-tensor": dict(global_num_tokens=torch.tensor(77.0)),
    "banned-tokens-in-bias": dict(banned_tokens=20),
    "all-options": dict(kl_estimator="k3+", dual_clip=2.0, clip_eps_high=0.3, clip_eps=0.15,
                        temperature=1.3, loss_agg="seq-mean-token-sum"),
}
_CASE_MAKER_KEYS = {"mask", "per_sequence_advantages", "banned_tokens", "bias", "with_old", "with_ref"}


@pytest.mark.parametrize("backend", FAST_ROW_BACKENDS)
@pytest.mark.parametrize("case_name", list(EDGE_CASES))
def test_edge_cases_match_eager(backend, case_name, triton_env):
    spec = dict(EDGE_CASES[case_name])
    b, t, h, v = spec.pop("shape", (3, 37, 16, 129))
    make_kwargs = {k: spec.pop(k) for k in list(spec) if k in _CASE_MAKER_KEYS}
    chunk_size = spec.pop("chunk_size", 16 if "shape" not in EDGE_CASES[case_name] else None)
    case = make_linear_case(b, t, h, v, seed=11, device=device_for(backend), **make_kwargs)
    options = dict(dict(kl_coef=0.05, entropy_coef=0.01), **spec)
    ref_out, ref_grads = run_eager(case, **options)
    out, grads = run_fused(case, backend, chunk_size=chunk_size, **options)
    assert_close_to_eager(out, grads, ref_out, ref_grads, what=f"{backend} {case_name}")
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_all_masked_gives_zero_loss_and_gradient():
    case = make_linear_case(mask="all-masked")
    out, grads = run_fused(case, chunk_size=16, kl_coef=0.1, entropy_coef=0.01)
    assert out.loss.item() == 0.0
    assert not out.logprobs.any() and not out.entropy.any()
    for g in grads.values():
        assert g is not None and not g.any()


def test_fully_masked_chunk_contributes_nothing():
    """Hidden rows of a fully masked chunk get zero gradient; changing them changes nothing."""
    case = make_linear_case(mask="chunk-masked", seed=3)
    out, grads = run_fused(case, chunk_size=16, kl_coef=0.1, entropy_coef=0.01)
    assert not grads["hidden"].reshape(-1, 16)[16:32].any()
    hidden = case.hidden.clone()
    hidden.view(-1, 16)[16:32] = 100.0
    out2, grads2 = run_fused(case._replace(hidden=hidden), chunk_size=16, kl_coef=0.1, entropy_coef=0.01)
    torch.testing.assert_close(out2.loss, out.loss, **FP32)
    torch.testing.assert_close(grads2["weight"], grads["weight"], **FP32)


def test_strided_hidden_view_and_int32_targets():
    case = make_linear_case(2, 12, 16, 129, seed=5)
    base = torch.randn(2, 13, 16)
    case = case._replace(hidden=base[:, :-1].clone(), targets=case.targets.to(torch.int32))
    ref_out, ref_grads = run_eager(case, kl_coef=0.1)
    hidden_base = base.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    out = rf.fused_linear_ppo_loss(hidden_base[:, :-1], weight, case.targets, case.advantages,
                                   case.old_logprobs, case.ref_logprobs, case.mask, bias=case.bias,
                                   chunk_size=5, kl_coef=0.1, backend="eager")
    out.loss.backward()
    assert_close_to_eager(out, {"hidden": hidden_base.grad[:, :-1], "weight": weight.grad, "bias": None},
                          ref_out, {**ref_grads, "bias": None})
    assert not hidden_base.grad[:, -1].any()


def test_flat_tokens():
    case = make_linear_case(1, 50, 16, 129, seed=2, mask="none")
    flat = LinearCase(case.hidden[0], case.weight, case.bias, case.targets[0], case.advantages[0],
                      case.old_logprobs[0], case.ref_logprobs[0], None)
    ref_out, ref_grads = run_eager(flat, kl_coef=0.1, entropy_coef=0.02)
    out, grads = run_fused(flat, chunk_size=16, kl_coef=0.1, entropy_coef=0.02)
    assert_close_to_eager(out, grads, ref_out, ref_grads)
    with pytest.raises(ValueError, match="loss_agg"):
        run_fused(flat, loss_agg="seq-mean-token-mean")


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (False, False, True)])
def test_partial_requires_grad(grads):
    case = make_linear_case(seed=4)
    ref_out, ref_grads = run_eager(case, kl_coef=0.1)
    out, got = run_fused(case, grads=grads, chunk_size=16, kl_coef=0.1)
    for (name, g), wanted in zip(got.items(), grads, strict=True):
        if wanted:
            torch.testing.assert_close(g, ref_grads[name], **FP32)
        else:
            assert g is None


def _ops_without_backward():
    def backward(*args, **kwargs):
        raise AssertionError("the gradient work should have been skipped")

    return backends.RowOps(REFERENCE_OPS.forward, backward, REFERENCE_OPS.logprobs)


def test_no_grad_skips_gradient_work(monkeypatch):
    case = make_linear_case(seed=6)
    ref_out, _ = run_eager(case, kl_coef=0.1, entropy_coef=0.01)
    monkeypatch.setitem(backends._loaded, "eager", _ops_without_backward())
    hidden, weight, bias = _leaves(case)
    with torch.no_grad():
        out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, case.old_logprobs,
                                       case.ref_logprobs, case.mask, bias=bias, chunk_size=16,
                                       kl_coef=0.1, entropy_coef=0.01, backend="eager")
    assert not out.loss.requires_grad
    assert_close_to_eager(out, {}, ref_out, {})
    # No input requires grad: the same, with grad mode on.
    out = rf.fused_linear_ppo_loss(case.hidden, case.weight, case.targets, case.advantages,
                                   case.old_logprobs, case.ref_logprobs, case.mask, bias=case.bias,
                                   chunk_size=16, kl_coef=0.1, entropy_coef=0.01, backend="eager")
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref_out.loss, **FP32)


GSPO = dict(policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4)


@pytest.mark.parametrize("options, chunk_size, logits_chunks", [
    (dict(policy_loss="cispo"), 16, 7),  # 3 × 37 rows in chunks of 16: one pass
    (dict(policy_loss="sapo"), 16, 7),
    (dict(kl_clamp=2.0, log_ratio_clamp=5.0), 16, 7),
    (GSPO, 16, 14),  # a sequence (37 rows) longer than a chunk: statistics pass, then the backward's
    (GSPO, 40, 3),  # whole sequences per chunk: one pass, one sequence per chunk
    (GSPO, 80, 2),  # two sequences, then one
    (dict(rollout_is="truncate", rollout_is_level="sequence", rollout_is_max=2.0), 80, 2),
])
def test_logits_are_formed_once_when_each_chunk_holds_what_its_coefficients_need(monkeypatch, options, chunk_size,
                                                                                  logits_chunks):
    """Token-local variants form each chunk's logits once (gradients in the forward, as plain PPO), and so do the
    sequence-level ones when whole sequences fit a chunk; else a statistics pass and the backward's recompute.
    Every path equals eager autograd in fp64."""
    from rlhf_fast.loss import chunked

    calls = []
    original = chunked._logits_chunk
    monkeypatch.setattr(chunked, "_logits_chunk", lambda *a: calls.append(1) or original(*a))
    case = make_linear_case(seed=11)
    hidden, weight, bias = (t.detach().double().requires_grad_() for t in (case.hidden, case.weight, case.bias))
    lp_inputs = [None if t is None else t.double() for t in (case.advantages, case.old_logprobs, case.ref_logprobs)]
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, **options)
    if "rollout_is" in options:
        kwargs["rollout_logprobs"] = lp_inputs[1] + 0.05 * torch.randn(lp_inputs[1].shape, dtype=torch.float64)
    out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, *lp_inputs, case.mask, bias=bias,
                                   chunk_size=chunk_size, backend="eager", **kwargs)
    out.loss.backward()
    assert len(calls) == logits_chunks
    passes = 2 if logits_chunks > -(-case.targets.numel() // chunk_size) else 1
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    eager = rf.ppo_loss(leaves[0] @ leaves[1].T + leaves[2], case.targets, *lp_inputs, case.mask, backend="eager",
                        **kwargs)
    eager.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-12, atol=1e-12)
    # the two-pass backward rounds its coefficients to fp32; the one-pass path keeps them in fp64
    tolerance = dict(rtol=1e-6, atol=1e-8) if passes == 2 else dict(rtol=1e-10, atol=1e-10)
    for mine, theirs in zip((hidden, weight, bias), leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance)


def test_default_chunk_grows_to_hold_whole_sequences_for_gspo(monkeypatch):
    """chunk_size=None and sequences (300 rows) longer than the default chunk (256): the chunk grows to one
    sequence, so GSPO forms the logits once per sequence; an explicit chunk_size is kept (two passes)."""
    from rlhf_fast.loss import chunked

    calls = []
    original = chunked._logits_chunk
    monkeypatch.setattr(chunked, "_logits_chunk", lambda *a: calls.append(a[3].shape[0]) or original(*a))
    case = make_linear_case(batch=2, seq=300, seed=12)
    assert default_chunk_size(case.weight.shape[0], case.hidden.shape[-1]) == 256
    for chunk_size, rows in ((None, [300, 300]), (256, [256, 256, 88] * 2)):
        calls.clear()
        hidden, weight = (t.detach().clone().requires_grad_() for t in (case.hidden, case.weight))
        out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, case.old_logprobs,
                                       case.ref_logprobs, case.mask, chunk_size=chunk_size, backend="eager", **GSPO)
        out.loss.backward()
        assert calls == rows


def test_upstream_gradient_scales_and_composes():
    case = make_linear_case(seed=8)
    _, ref_grads = run_eager(case, kl_coef=0.1)
    hidden, weight, bias = _leaves(case)
    out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, case.old_logprobs,
                                   case.ref_logprobs, case.mask, bias=bias, chunk_size=16, kl_coef=0.1)
    (2.5 * out.loss + (weight**2).sum()).backward()
    torch.testing.assert_close(hidden.grad, 2.5 * ref_grads["hidden"], **FP32)
    torch.testing.assert_close(weight.grad, 2.5 * ref_grads["weight"] + 2 * weight.detach(), **FP32)
    torch.testing.assert_close(bias.grad, 2.5 * ref_grads["bias"], **FP32)


def test_second_backward_raises():
    case = make_linear_case(seed=9, mask="none")
    hidden, weight, bias = _leaves(case)
    out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, bias=bias)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


def test_double_backward_raises():
    case = make_linear_case(seed=9, mask="none")
    hidden, weight, bias = _leaves(case)
    out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, bias=bias)
    (grad_w,) = torch.autograd.grad(out.loss, weight, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_w.sum().backward()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_finite_differences_fp64(agg):
    """The chunked pass differentiates its own forward (fp64, eager row ops).

    ``torch.autograd.gradcheck`` backpropagates through one output several times, which
    this function refuses by design (its gradients are handed out once), so the same
    check is written out: central differences of the loss vs one backward.
    """
    case = make_linear_case(2, 5, 3, 11, dtype=torch.float64, seed=1)
    inputs = _leaves(case)

    def loss(h, w, b):
        return rf.fused_linear_ppo_loss(h, w, case.targets, case.advantages.double(),
                                        case.old_logprobs.double(), case.ref_logprobs.double(), case.mask,
                                        bias=b, chunk_size=3, kl_coef=0.1, entropy_coef=0.05,
                                        temperature=0.9, loss_agg=agg).loss

    value = loss(*inputs)
    assert value.dtype == torch.float64
    value.backward()
    eps = 1e-6
    with torch.no_grad():
        for x in inputs:
            numerical = torch.empty_like(x)
            for i in range(x.numel()):
                orig = x.view(-1)[i].item()
                x.view(-1)[i] = orig + eps
                up = loss(*inputs)
                x.view(-1)[i] = orig - eps
                down = loss(*inputs)
                x.view(-1)[i] = orig
                numerical.view(-1)[i] = (up - down) / (2 * eps)
            # gradcheck's default tolerances (central differences, eps = 1e-6, fp64)
            torch.testing.assert_close(x.grad, numerical, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------
# bf16: the contract's double baseline.
# ----------------------------------------------------------------------------------


def _values(out, grads) -> Dict[str, torch.Tensor]:
    vals = {"loss": out.loss, "logprobs": out.logprobs, "entropy": out.entropy}
    vals.update({f"d{k}": v for k, v in grads.items() if v is not None})
    vals.update({f"metric:{k}": v for k, v in out.metrics.items()})
    return vals


BF16_OPTIONS = [
    dict(kl_coef=0.1, entropy_coef=0.01),
    dict(kl_coef=0.1, kl_estimator="k2", dual_clip=3.0, clip_eps_high=0.28, temperature=0.7,
         loss_agg="seq-mean-token-mean"),
]


@pytest.mark.parametrize("backend", FAST_ROW_BACKENDS)
@pytest.mark.parametrize("options", BF16_OPTIONS, ids=["token-mean", "seq-mean"])
def test_bf16_double_baseline(backend, options):
    case = make_linear_case(4, 40, 64, 1000, dtype=torch.bfloat16, seed=12, device=device_for(backend))
    truth_out, truth_grads = run_eager(case, dtype=torch.float64, **options)
    eager_out, eager_grads = run_eager(case, **options)
    out, grads = run_fused(case, backend, chunk_size=48, **options)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16, name
    truth, eager, got = _values(truth_out, truth_grads), _values(eager_out, eager_grads), _values(out, grads)
    for name, want in truth.items():
        err = max_error(got[name], want)
        bound = DOUBLE_BASELINE_FACTOR * max_error(eager[name], want) + DOUBLE_BASELINE_ATOL
        assert err <= bound, f"{backend} {name}: error {err:.3g} > bound {bound:.3g}"


# ----------------------------------------------------------------------------------
# fused_linear_logprobs.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST_ROW_BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_match_eager(backend, with_entropy, triton_env):
    case = make_linear_case(3, 11, 16, 1000, seed=13, banned_tokens=5, device=device_for(backend))
    logits = case.hidden @ case.weight.T + case.bias
    want = rf.logprobs(logits, case.targets, case.mask, temperature=0.8, with_entropy=with_entropy,
                       backend="eager")
    got = rf.fused_linear_logprobs(case.hidden, case.weight, case.targets, case.mask, bias=case.bias,
                                   temperature=0.8, with_entropy=with_entropy, chunk_size=7, backend=backend)
    if not with_entropy:
        want, got = (want,), (got,)
    for w, g in zip(want, got, strict=True):
        assert g.dtype == torch.float32 and g.shape == case.targets.shape and not g.requires_grad
        torch.testing.assert_close(g, w, **FP32)


def test_logprobs_agree_with_loss_and_have_no_grad_under_no_grad():
    case = make_linear_case(seed=14)
    hidden, weight, bias = _leaves(case)
    with torch.no_grad():
        lp, entropy = rf.fused_linear_logprobs(hidden, weight, case.targets, case.mask, bias=bias,
                                               with_entropy=True)
    assert not lp.requires_grad
    out = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, mask=case.mask, bias=bias)
    torch.testing.assert_close(lp, out.logprobs, **FP32)
    torch.testing.assert_close(entropy, out.entropy, **FP32)


# ----------------------------------------------------------------------------------
# Chunk size rule and bad inputs.
# ----------------------------------------------------------------------------------


def test_default_chunk_size_rule():
    assert default_chunk_size(32000, 256) == 256  # about H
    assert default_chunk_size(129, 16) == 256  # at least 256
    assert default_chunk_size(151936, 4096) == 512  # buffer ≤ 2**27 elements
    assert default_chunk_size(32000, 8192) == 4096
    for vocab in (129, 32000, 151936, 1 << 22):
        for hidden_size in (8, 256, 4096, 16384):
            chunk = default_chunk_size(vocab, hidden_size)
            assert chunk >= 16 and chunk * vocab <= max(1 << 27, 16 * vocab)


def test_exported():
    assert "fused_linear_ppo_loss" in rf.__all__ and "fused_linear_logprobs" in rf.__all__


def _bad(**changes):
    case = make_linear_case(2, 5, 8, 33, seed=0, mask="none")
    args = dict(hidden=case.hidden, weight=case.weight, targets=case.targets, advantages=case.advantages,
                old_logprobs=case.old_logprobs, ref_logprobs=case.ref_logprobs, mask=None, bias=case.bias)
    args.update(changes)
    return args


BAD_INPUTS = {
    "hidden-not-tensor": (dict(hidden=[[1.0]]), "hidden"),
    "hidden-int": (dict(hidden=torch.ones(2, 5, 8, dtype=torch.int64)), "hidden"),
    "hidden-0d": (dict(hidden=torch.tensor(1.0)), "hidden"),
    "weight-1d": (dict(weight=torch.randn(33)), "weight"),
    "weight-wrong-H": (dict(weight=torch.randn(33, 7)), "weight"),
    "weight-empty-V": (dict(weight=torch.randn(0, 8), bias=None), "weight"),
    "weight-dtype": (dict(weight=torch.randn(33, 8, dtype=torch.float64)), "weight"),
    "weight-device": (dict(weight=torch.randn(33, 8, device="meta")), "weight"),
    "bias-shape": (dict(bias=torch.randn(32)), "bias"),
    "bias-dtype": (dict(bias=torch.randn(33, dtype=torch.bfloat16)), "bias"),
    "bias-device": (dict(bias=torch.randn(33, device="meta")), "bias"),
    "chunk-zero": (dict(chunk_size=0), "chunk_size"),
    "chunk-negative": (dict(chunk_size=-4), "chunk_size"),
    "chunk-float": (dict(chunk_size=2.5), "chunk_size"),
    "targets-shape": (dict(targets=torch.zeros(2, 4, dtype=torch.int64)), "targets"),
    "targets-float": (dict(targets=torch.zeros(2, 5)), "targets"),
    "targets-device": (dict(targets=torch.zeros(2, 5, dtype=torch.int64, device="meta")), "targets"),
    "target-out-of-range": (dict(targets=torch.full((2, 5), 33)), "targets"),
    "mask-shape": (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    "advantages-shape": (dict(advantages=torch.randn(3)), "advantages"),
    "old-shape": (dict(old_logprobs=torch.randn(2, 4)), "old_logprobs"),
    "ref-shape": (dict(ref_logprobs=torch.randn(5)), "ref_logprobs"),
    "kl-without-ref": (dict(ref_logprobs=None, kl_coef=0.1), "ref_logprobs"),
    "temperature": (dict(temperature=0.0), "temperature"),
    "clip-eps": (dict(clip_eps=-0.1), "clip_eps"),
    "dual-clip": (dict(dual_clip=1.0), "dual_clip"),
    "estimator": (dict(kl_estimator="k4"), "kl_estimator"),
    "loss-agg": (dict(loss_agg="mean"), "loss_agg"),
    "backend": (dict(backend="cuda"), "backend"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error(name):
    changes, message = BAD_INPUTS[name]
    args = _bad(**changes)
    with pytest.raises(ValueError, match=message):
        rf.fused_linear_ppo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"),
                                 args.pop("advantages"), args.pop("old_logprobs"), args.pop("ref_logprobs"),
                                 args.pop("mask"), **args)


def test_logprobs_bad_inputs():
    case = make_linear_case(2, 5, 8, 33, seed=0, mask="none")
    with pytest.raises(ValueError, match="temperature"):
        rf.fused_linear_logprobs(case.hidden, case.weight, case.targets, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        rf.fused_linear_logprobs(case.hidden, case.weight, case.targets, chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        rf.fused_linear_logprobs(case.hidden, case.weight[:, :4], case.targets)


def test_inplace_backward_is_not_an_option():
    case = make_linear_case(2, 5, 8, 33, seed=0, mask="none")
    with pytest.raises(TypeError):
        rf.fused_linear_ppo_loss(case.hidden, case.weight, case.targets, case.advantages,
                                 inplace_backward=True)


# ----------------------------------------------------------------------------------
# Policy-loss variants and corrections: statistics pass, then a backward that recomputes the chunks.
# ----------------------------------------------------------------------------------

VARIANTS = {
    "gspo-sequence-is": dict(policy_loss="gspo", rollout_is="truncate", rollout_is_level="sequence",
                             loss_agg="seq-mean-token-mean", kl_coef=0.1),
    "cispo-clamps": dict(policy_loss="cispo", clip_eps_high=3.0, kl_coef=0.1, kl_clamp=0.05, log_ratio_clamp=0.6,
                         entropy_coef=0.02),
    "sapo-mask-is": dict(policy_loss="sapo", rollout_is="mask", rollout_is_min=0.9, rollout_is_max=1.1,
                         kl_coef=0.1, kl_ratio_weighted=True, temperature=0.8),
    "ppo-token-is": dict(rollout_is="truncate", dual_clip=3.0, kl_coef=0.1, loss_agg="seq-mean-token-sum-norm"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_variants_match_eager(backend, variant, triton_env):
    case = make_linear_case(2, 9, 16, 97, seed=17, device=device_for(backend), mask="random")
    options = dict(VARIANTS[variant])
    if options.get("rollout_is", "none") != "none":
        options["rollout_logprobs"] = case.old_logprobs + 0.05 * torch.sin(3 * case.old_logprobs)
    ref_out, ref_grads = run_eager(case, **options)
    out, grads = run_fused(case, backend, chunk_size=5, **options)
    assert_close_to_eager(out, grads, ref_out, ref_grads, what=f"{backend} {variant}")


def test_one_walk_serves_every_pass():
    """chunked.walk visits each chunk once, in order (or the given spans), hands the step the transformed
    logits, calls the backend's backward only when gradients are wanted, and then turns the step's
    coefficients into the input gradients: with c_lp = 1, d(hidden) and d(W) are those of Σ lp by autograd
    through the eager math (fp64, to 1e-12)."""
    from rlhf_fast.loss import chunked
    from rlhf_fast.loss.logit_transform import LogitTransform
    from rlhf_fast.loss.reference import selective_logprobs_entropy

    gen = torch.Generator().manual_seed(40)
    hidden = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (10,), generator=gen)
    transform = LogitTransform(scale=0.5, softcap=2.0)
    calls = []
    ops = REFERENCE_OPS._replace(backward=lambda *args: calls.append(args) or REFERENCE_OPS.backward(*args))
    seen = []

    def step(span, logits3, with_grad):
        seen.append((span.start, span.stop, with_grad))
        torch.testing.assert_close(logits3[0], 2.0 * torch.tanh(0.5 * (hidden[span] @ weight.T) / 2.0),
                                   rtol=1e-12, atol=1e-12)
        stats = ops.logprobs(logits3, targets[span], 1.0, True)
        ones = torch.ones(span.stop - span.start, dtype=torch.float64)
        return chunked.ChunkStep(stats.row_max, stats.log_sum, stats.entropy, stats.outside, ones, 0 * ones)

    common = dict(ops=ops, targets=targets, temperature=1.0, transform=transform)
    assert chunked.walk(hidden, weight, None, 4, step, **common) is None
    assert seen == [(0, 4, False), (4, 8, False), (8, 10, False)] and not calls
    seen.clear()
    grads = chunked.Gradients(hidden, weight, (True, True, False))
    d_hidden, d_weight, d_bias = chunked.walk(hidden, weight, None, 4, step, grads=grads,
                                              spans=[slice(0, 3), slice(3, 7), slice(7, 10)], **common)
    assert seen == [(0, 3, True), (3, 7, True), (7, 10, True)] and len(calls) == 3 and d_bias is None
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = selective_logprobs_entropy(2.0 * torch.tanh(0.5 * (h @ w.T) / 2.0), targets, 1.0)[0]
    want_hidden, want_weight = torch.autograd.grad(lp.sum(), (h, w))
    torch.testing.assert_close(d_hidden, want_hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_weight, want_weight, rtol=1e-12, atol=1e-12)
