"""The Triton kernels row by row against the closed-form reference (``reference.token_*``).

Through :data:`rlhf_fast.backends.triton.ROW_OPS` directly, so a failure points at a kernel,
not at the plumbing. Without a GPU the kernels run in the Triton interpreter on small
shapes; the ``cuda`` tests add bf16/fp16 with the double baseline of SPEC §7, realistic
vocabularies, more rows than a 65535-limited grid axis, and the no-recompilation promise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON, TRITON_INTERPRETED
from helpers import (
    DOUBLE_BASELINE_ATOL,
    DOUBLE_BASELINE_FACTOR,
    TOLERANCES,
    assert_double_baseline,
    make_case,
    make_config,
    max_error,
    outputs_dict,
    run_loss,
)

import rlhf_fast as rf
from rlhf_fast import backends
from rlhf_fast.backends import TokenResults
from rlhf_fast.loss import reference
from rlhf_fast.loss.functional import rows_view

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason=f"triton backend: {backends.load_ops('triton')[1]}")

DEVICE = "cuda" if HAS_CUDA else "cpu"
FP32 = TOLERANCES[torch.float32]
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(triton_env):
    """Interpreted kernels need TRITON_INTERPRET=1 when they run, not only at import."""


def _ops():
    return backends.load_ops("triton")[0]


def make_rows(
    batch: int,
    seq: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    strided: bool = True,
    int32_targets: bool = False,
    banned_tokens: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    device: str = DEVICE,
):
    """Logits as the backends see them (``[B, T, V]`` view) and per-row vectors ``[N]``.

    ``strided`` takes ``logits[:, :-1]`` of a ``[B, T+1, V]`` buffer; old/ref log-probs
    sit near the current ones at ``temperature``, so that ratios fall on both sides of the
    clip range and the KL stays in the range training sees.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, seq + int(strided), vocab, generator=gen) * 2.0
    targets = torch.randint(0, vocab, (batch * seq,), generator=gen)
    logits = base[:, :-1] if strided else base
    for row in range(batch * seq if banned_tokens else 0):
        banned = torch.randperm(vocab, generator=gen)[: banned_tokens + 1]
        banned = banned[banned != targets[row]][:banned_tokens]
        logits[row // seq, row % seq, banned] = float("-inf")
    lp = torch.log_softmax(logits.to(dtype).double() / temperature, -1).reshape(-1, vocab)
    lp = lp.gather(-1, targets[:, None]).squeeze(-1).float()
    rows = batch * seq
    vectors = dict(
        advantages=torch.randn(rows, generator=gen),
        old_logprobs=lp + 0.4 * torch.randn(rows, generator=gen),
        ref_logprobs=lp + 0.4 * torch.randn(rows, generator=gen),
    )
    base = base.to(dtype=dtype, device=device)
    logits3 = rows_view(base[:, :-1] if strided else base)
    targets = targets.to(torch.int32 if int32_targets else torch.int64).to(device)
    return logits3, targets, {k: v.to(device) for k, v in vectors.items()}


def _forward_both(logits3, targets, vec, cfg):
    old = vec["old_logprobs"] if cfg.has_old else None
    ref = vec["ref_logprobs"] if cfg.has_ref else None
    got = _ops().forward(logits3, targets, vec["advantages"], old, ref, cfg)
    want = reference.token_forward(logits3, targets, vec["advantages"], old, ref, cfg)
    return got, want


def _assert_token_results(got: TokenResults, want: TokenResults, what: str) -> None:
    assert isinstance(got, TokenResults)
    for name, g, w in zip(TokenResults._fields, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, f"{what} {name}: {g.dtype} {g.shape}"
        torch.testing.assert_close(g, w, **FP32, msg=lambda m, n=name: f"{what} {n}: {m}")


CONFIGS = {
    "all-options": dict(clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
                        entropy_coef=0.01, temperature=0.7, has_old=True, has_ref=True),
    "on-policy-no-ref": dict(has_old=False, has_ref=False),
    "k1": dict(kl_coef=0.05, kl_estimator="k1", has_old=True, has_ref=True),
    "k2-dual": dict(kl_coef=0.05, kl_estimator="k2", dual_clip=2.0, has_old=True, has_ref=True),
    "k3+-entropy": dict(kl_coef=0.05, kl_estimator="k3+", entropy_coef=0.02, temperature=1.3,
                        has_old=True, has_ref=True),
    "kl-metric-only": dict(kl_coef=0.0, kl_estimator="k3", has_old=True, has_ref=True),
}

SHAPES = {
    "V129-strided": dict(shape=(2, 5, 129)),
    "V1000-int32-contiguous": dict(shape=(2, 4, 1000), strided=False, int32_targets=True),
    "one-row": dict(shape=(1, 1, 129), strided=False),
    "T1-strided": dict(shape=(3, 1, 129)),
    "banned-tokens": dict(shape=(2, 3, 129), banned_tokens=40),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_forward_options(config_name):
    cfg = make_config(**CONFIGS[config_name])
    logits3, targets, vec = make_rows(2, 5, 129, temperature=cfg.temperature, seed=1)
    got, want = _forward_both(logits3, targets, vec, cfg)
    _assert_token_results(got, want, config_name)


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_forward_shapes(shape_name):
    spec = dict(SHAPES[shape_name])
    logits3, targets, vec = make_rows(*spec.pop("shape"), temperature=0.7, seed=2, **spec)
    got, want = _forward_both(logits3, targets, vec, make_config(**CONFIGS["all-options"]))
    _assert_token_results(got, want, shape_name)


def test_forward_only_target_left():
    """Every logit but the target's banned: p_y = 1, lp = 0, H = 0, no NaN."""
    logits3, targets, vec = make_rows(1, 3, 129, strided=False, seed=3)
    flat = logits3.reshape(-1, 129)
    keep = flat.gather(-1, targets[:, None].long())
    flat.fill_(float("-inf")).scatter_(-1, targets[:, None].long(), keep)
    got, _ = _forward_both(logits3, targets, vec, make_config(**CONFIGS["all-options"]))
    assert torch.isfinite(torch.stack(got)).all()
    torch.testing.assert_close(got.logprobs, torch.zeros_like(got.logprobs))
    torch.testing.assert_close(got.entropy, torch.zeros_like(got.entropy))


def test_forward_propagates_nan_and_inf():
    logits3, targets, vec = make_rows(1, 3, 129, strided=False, seed=4)
    logits3[0, 0, 7] = float("nan")
    logits3[0, 1, 9] = float("inf")
    got, _ = _forward_both(logits3, targets, vec, make_config(**CONFIGS["all-options"]))
    for row in (0, 1):
        lse = got.row_max[row] + got.log_sum[row]
        assert torch.isnan(lse) or torch.isinf(lse)
        assert not torch.isfinite(got.loss[row])
    assert torch.isfinite(torch.stack(got)[:, 2]).all()


def _coefficients(rows: int, seed: int, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    coef_logprob = torch.randn(rows, generator=gen)
    coef_entropy = 0.05 * torch.randn(rows, generator=gen)
    coef_logprob[0] = coef_entropy[0] = 0.0  # a masked token
    return coef_logprob.to(device), coef_entropy.to(device)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
def test_backward(shape_name, inplace):
    spec = dict(SHAPES[shape_name])
    logits3, targets, vec = make_rows(*spec.pop("shape"), seed=5, **spec)
    temperature = 0.7
    lp, entropy, row_max, log_sum = reference.token_logprobs(logits3, targets, temperature, True)
    coef_logprob, coef_entropy = _coefficients(lp.numel(), seed=6)
    want = reference.token_backward(logits3, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy,
                                    temperature)
    out = logits3 if inplace else torch.full_like(logits3, float("nan"))
    _ops().backward(logits3, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out)
    torch.testing.assert_close(out, want, **FP32)
    assert torch.isfinite(out).all()
    assert not out[0, 0].any(), "a row with zero coefficients has a zero gradient"


def test_backward_into_strided_buffer():
    """``out`` with its own strides (a column slice of a wider buffer)."""
    logits3, targets, vec = make_rows(2, 3, 129, strided=False, seed=7)
    lp, entropy, _, _ = reference.token_logprobs(logits3, targets, 1.0, True)
    lse = torch.logsumexp(logits3.reshape(-1, 129), -1)
    coef_logprob, coef_entropy = _coefficients(lp.numel(), seed=8)
    wide = torch.zeros(1, 6, 300, device=DEVICE)
    out = wide[:, :, 5:134]  # the shape of logits3 ([1, 6, 129]), row stride 300
    zero = torch.zeros_like(lse)  # (m, log s) = (lse, 0) describe the same normaliser
    _ops().backward(logits3, targets, lse, zero, entropy, coef_logprob, coef_entropy, 1.0, out)
    want = reference.token_backward(logits3, targets, lse, zero, entropy, coef_logprob, coef_entropy, 1.0)
    torch.testing.assert_close(out, want, **FP32)
    assert not wide[:, :, :5].any() and not wide[:, :, 134:].any()


def test_backward_skips_rows_with_zero_coefficients():
    """A masked token's row is never read: NaN logits there still give a zero gradient."""
    logits3, targets, vec = make_rows(1, 3, 129, strided=False, seed=9)
    logits3[0, 0] = float("nan")
    lse = torch.logsumexp(logits3.reshape(-1, 129), -1)
    entropy = torch.ones(3, device=DEVICE)
    coef_logprob, coef_entropy = _coefficients(3, seed=10)
    out = torch.full_like(logits3, float("nan"))
    _ops().backward(logits3, targets, lse, torch.zeros_like(lse), entropy, coef_logprob, coef_entropy, 1.0, out)
    assert (out[0, 0] == 0).all() and torch.isfinite(out[0, 1:]).all()


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("shape_name", ["V129-strided", "V1000-int32-contiguous", "banned-tokens"])
def test_logprobs(shape_name, with_entropy):
    spec = dict(SHAPES[shape_name])
    logits3, targets, _ = make_rows(*spec.pop("shape"), seed=11, **spec)
    lp, entropy, _, _ = _ops().logprobs(logits3, targets, 0.9, with_entropy)
    want_lp, want_entropy, _, _ = reference.token_logprobs(logits3, targets, 0.9, True)
    torch.testing.assert_close(lp, want_lp, **FP32)
    if with_entropy:
        torch.testing.assert_close(entropy, want_entropy, **FP32)
    else:
        assert entropy is None


def test_launch_config():
    from rlhf_fast.kernels.ppo_loss import launch_config

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for vocab in (1, 129, 1000, 32000, 50257, 128256, 151936):
            cfg = launch_config(vocab, dtype)
            for block, warps in ((cfg.block_v, cfg.num_warps), (cfg.bwd_block_v, cfg.bwd_num_warps)):
                assert block & (block - 1) == 0 and block * dtype.itemsize <= 8192
                assert warps in (1, 2, 4, 8)
    assert launch_config(151936, torch.bfloat16) == launch_config(32000, torch.bfloat16)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
def test_ppo_loss_in_compiled_step(inplace, triton_env):
    """``rf.ppo_loss`` inside ``torch.compile(fullgraph=True)``: no graph break, same values.

    In the interpreter the ops are opaque custom ops; on CUDA they are triton_ops that
    the compiler traces into (see also test_triton_aot.py for that trace on CPU).
    """
    torch._dynamo.reset()
    case = make_case(2, 5, 129, strided=True, seed=12, device=DEVICE)

    def step(base):
        logits = (base * 1.0)[:, :-1]  # in place: a slice of a non-leaf, as an lm_head output
        out = rf.ppo_loss(
            logits, case.targets, case.advantages, case.old_logprobs, case.ref_logprobs, case.mask,
            kl_coef=0.1, entropy_coef=0.01, temperature=0.7, dual_clip=3.0,
            inplace_backward=inplace, validate=False, backend="triton",
        )
        return out.loss, out.metrics["clipfrac"]

    base = case.logits_base.detach().clone().requires_grad_(True)
    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        base.grad = None
        loss, clipfrac = fn(base)
        loss.backward()
        grads.append((loss.detach(), clipfrac, base.grad.clone()))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, **FP32)


# ----------------------------------------------------------------------------------
# CUDA: low precision, realistic vocabularies, grid limits, no recompilation
# ----------------------------------------------------------------------------------


def _low_precision_values(logits3, targets, vec, cfg, dtype_logits3):
    """Per-row forward values and d(logits) from the kernel, the eager reference, fp64 truth."""
    ops = _ops()
    adv, old, ref = vec["advantages"], vec["old_logprobs"], vec["ref_logprobs"]
    gen = torch.Generator().manual_seed(13)
    coef_logprob = torch.randn(targets.numel(), generator=gen).to(logits3.device)
    coef_entropy = 0.05 * torch.randn(targets.numel(), generator=gen).to(logits3.device)

    def values(res: TokenResults, grad):
        return {"logprobs": res.logprobs, "entropy": res.entropy, "lse": res.row_max + res.log_sum, "loss": res.loss,
                "dlogp": res.dlogp, "grad": grad}

    kernel = ops.forward(dtype_logits3, targets, adv, old, ref, cfg)
    out = torch.empty_like(dtype_logits3)
    ops.backward(dtype_logits3, targets, kernel.row_max, kernel.log_sum, kernel.entropy, coef_logprob, coef_entropy,
                 cfg.temperature, out)
    eager = reference.token_forward(dtype_logits3, targets, adv, old, ref, cfg)
    eager_grad = reference.token_backward(dtype_logits3, targets, eager.row_max, eager.log_sum, eager.entropy,
                                          coef_logprob, coef_entropy, cfg.temperature)
    wide = dtype_logits3.double()
    truth = reference.token_forward(wide, targets, adv.double(), old.double(), ref.double(), cfg)
    truth_grad = reference.token_backward(wide, targets, truth.row_max, truth.log_sum, truth.entropy,
                                          coef_logprob.double(),
                                          coef_entropy.double(), cfg.temperature)
    return values(kernel, out), values(eager, eager_grad), values(truth, truth_grad)


@cuda
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_low_precision_double_baseline(dtype, vocab):
    """SPEC §7: error vs fp64 truth ≤ 2× the eager reference's own error + 1e-6."""
    logits3, targets, vec = make_rows(4, 8, vocab, dtype=dtype, temperature=0.7, seed=14)
    cfg = make_config(**CONFIGS["all-options"])
    kernel, eager, truth = _low_precision_values(logits3, targets, vec, cfg, logits3)
    for name in truth:
        err = max_error(kernel[name], truth[name])
        bound = DOUBLE_BASELINE_FACTOR * max_error(eager[name], truth[name]) + DOUBLE_BASELINE_ATOL
        assert err <= bound, f"{dtype} V={vocab} {name}: error {err:.3g} > bound {bound:.3g}"
    assert kernel["grad"].dtype == dtype


@cuda
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_cuda_fp32_large_vocab(vocab):
    logits3, targets, vec = make_rows(2, 8, vocab, temperature=0.7, seed=15)
    got, want = _forward_both(logits3, targets, vec, make_config(**CONFIGS["all-options"]))
    _assert_token_results(got, want, f"V={vocab}")
    lp, entropy, _, _ = _ops().logprobs(logits3, targets, 0.7, True)
    torch.testing.assert_close(lp, want.logprobs, **FP32)
    torch.testing.assert_close(entropy, want.entropy, **FP32)


@cuda
@needs_cuda
def test_cuda_more_rows_than_a_grid_axis_limit():
    """70000 rows > 65535: rows must sit on grid axis 0."""
    logits3, targets, vec = make_rows(1, 70000, 129, strided=False, temperature=0.7, seed=16)
    cfg = make_config(**CONFIGS["all-options"])
    got, want = _forward_both(logits3, targets, vec, cfg)
    _assert_token_results(got, want, "70000 rows")
    coef_logprob, coef_entropy = _coefficients(70000, seed=17)
    out = torch.empty_like(logits3)
    _ops().backward(logits3, targets, want.row_max, want.log_sum, want.entropy, coef_logprob, coef_entropy, 0.7, out)
    want_grad = reference.token_backward(logits3, targets, want.row_max, want.log_sum, want.entropy, coef_logprob,
                                         coef_entropy, 0.7)
    torch.testing.assert_close(out, want_grad, **FP32)


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton has no JITFunction.device_caches to count compiled variants")
    return sum(len(entry[0]) for entry in caches.values())


@cuda
@needs_cuda
def test_cuda_no_recompilation_for_new_shapes_or_hyperparameters():
    from rlhf_fast.kernels import ppo_loss as kernels

    cfg = make_config(**CONFIGS["all-options"])
    logits3, targets, vec = make_rows(2, 4, 32000, dtype=torch.bfloat16, seed=18)
    _forward_both(logits3, targets, vec, cfg)
    before = _compiled_variants(kernels._ppo_forward_kernel)
    other = dict(CONFIGS["all-options"], clip_eps=0.1, clip_eps_high=0.3, dual_clip=4.0, kl_coef=0.3,
                 entropy_coef=0.05, temperature=1.1)
    logits3, targets, vec = make_rows(3, 7, 50272, dtype=torch.bfloat16, seed=19)
    _forward_both(logits3, targets, vec, make_config(**other))
    assert _compiled_variants(kernels._ppo_forward_kernel) == before


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_public_api_double_baseline(dtype, use_backend):
    """``rf.ppo_loss`` end to end in low precision, V = 32000 (SPEC §7)."""
    case = make_case(4, 16, 32000, dtype=dtype, strided=True, seed=20, device=DEVICE)
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.9, dual_clip=3.0)
    truth = outputs_dict(*run_loss(case, "eager", logits_dtype=torch.float64, **options))
    eager = outputs_dict(*run_loss(case, "eager", **options))
    fused = outputs_dict(*run_loss(case, use_backend("triton"), **options))
    assert_double_baseline(fused, eager, truth, what=str(dtype))


if TRITON_INTERPRETED:
    # The interpreter evaluates both sides of tl.where, including the 0·(−inf) it guards.
    pytestmark = [pytestmark, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
