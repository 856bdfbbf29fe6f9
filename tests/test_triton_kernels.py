"""The Triton kernels row by row against the closed-form reference (``reference.token_*``).

Through :data:`rlhf_fast.backends.triton.ROW_OPS` directly, so a failure points at a kernel,
not at the plumbing. Without a GPU the kernels run in the Triton interpreter on small
shapes: every option, vocabularies that are not multiples of 16 (the head, body, tail and
edge of a row), split rows, the gradient computed in the forward, and the numerics of the
contract (docs/contract.md, "Numerics"): large offsets, NaN that propagates, overflowing
ratios and KL, jumps of the row max, bf16 rounding. The ``cuda`` tests add bf16/fp16 with
the double baseline of the contract's "Accuracy" section, realistic vocabularies, more rows
than a 65535-limited grid axis, and the no-recompilation promise.
"""

from __future__ import annotations

import math

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
from rlhf_fast.backends.rows import KERNEL_OUTPUTS
from rlhf_fast.loss import reference
from rlhf_fast.loss.functional import rows_view

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason=f"triton backend: {backends.load_ops('triton')[1]}")

DEVICE = "cuda" if HAS_CUDA else "cpu"
FP32 = TOLERANCES[torch.float32]
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

KERNEL_FIELDS = TokenResults._fields[:KERNEL_OUTPUTS]  # what the kernels write (not ``outside``)


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
    for name, g, w in zip(KERNEL_FIELDS, got, want):
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
    assert torch.isfinite(torch.stack(got[:KERNEL_OUTPUTS])).all()
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
    assert torch.isfinite(torch.stack(got[:KERNEL_OUTPUTS])[:, 2]).all()


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
    lp, entropy, row_max, log_sum = reference.token_logprobs(logits3, targets, temperature, True)[:4]
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
    lp, entropy, _, _ = reference.token_logprobs(logits3, targets, 1.0, True)[:4]
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
    lp, entropy, _, _ = _ops().logprobs(logits3, targets, 0.9, with_entropy)[:4]
    want_lp, want_entropy, _, _ = reference.token_logprobs(logits3, targets, 0.9, True)[:4]
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
                assert block * dtype.itemsize == warps * 32 * 4 * 16, "four 16-byte vectors per thread"
            assert cfg.parts == cfg.bwd_parts == 1, "enough rows: one program per row"
            block_bytes = triton_next_power_of_2(vocab) * dtype.itemsize
            # four chunks of whole 16-byte vectors, the row in registers
            assert cfg.grad_row_block == (triton_next_power_of_2(vocab) if 64 <= block_bytes <= 65536 else 0)
            few = launch_config(vocab, dtype, rows=16, num_sms=132)
            assert (few.parts > 1) == (vocab // few.block_v > 1), "few rows: split, when a row has tiles to share"
    # One compiled streaming kernel for every large vocabulary of a dtype.
    big, other = launch_config(151936, torch.bfloat16), launch_config(32000, torch.bfloat16)
    assert big[:4] == other[:4]


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


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
# Any vocabulary: head, 16-byte body, tail and edges of a row; split rows
# ----------------------------------------------------------------------------------


def _kernels():
    from rlhf_fast.kernels import ppo_loss as kernels

    return kernels


def _launch_all(logits3, targets, vec, params, config):
    """forward, logprobs and backward through the launchers with an explicit launch config."""
    kernels = _kernels()
    rows = targets.numel()
    empty = lambda: torch.empty(rows, device=logits3.device)  # noqa: E731
    outputs = tuple(empty() for _ in KERNEL_FIELDS)
    from rlhf_fast.backends import ops

    values = ops.token_inputs(logits3, targets, vec["advantages"], vec["old_logprobs"], vec["ref_logprobs"], params)
    kernels.ppo_forward(ops.PPO_FORWARD.bind(**values), outputs, config=config)
    stats = tuple(empty() for _ in range(4))
    kernels.logprobs(ops.LOGPROBS.bind(logits3, targets, params.temperature, True), stats, config=config)
    coef_logprob, coef_entropy = _coefficients(rows, seed=31)
    grad = torch.full_like(logits3, float("nan"))
    res = TokenResults(*outputs)
    call = ops.PPO_BACKWARD.bind(logits3, targets, res.row_max, res.log_sum, res.entropy, coef_logprob, coef_entropy,
                                 params.temperature, grad)  # fmt: skip
    kernels.ppo_backward(call, config=config)
    return res, stats, grad, (coef_logprob, coef_entropy)


def _check_all(logits3, targets, vec, params, config, what):
    res, (lp, entropy, row_max, log_sum), grad, coefs = _launch_all(logits3, targets, vec, params, config)
    want = reference.token_forward(logits3, targets, vec["advantages"], vec["old_logprobs"], vec["ref_logprobs"],
                                   params)  # fmt: skip
    _assert_token_results(res, want, what)
    for name, got, value in (("logprobs", lp, want.logprobs), ("entropy", entropy, want.entropy),
                             ("row_max", row_max, want.row_max), ("log_sum", log_sum, want.log_sum)):
        torch.testing.assert_close(got, value, **FP32, msg=lambda m, n=name: f"{what} logprobs op {n}: {m}")
    want_grad = reference.token_backward(logits3, targets, want.row_max, want.log_sum, want.entropy, *coefs,
                                         params.temperature)  # fmt: skip
    if logits3.dtype == torch.float32:
        torch.testing.assert_close(grad, want_grad, **FP32, msg=lambda m: f"{what} d(logits): {m}")
    else:  # the double baseline against the fp64 truth of the same inputs
        wide = logits3.double()
        truth = reference.token_forward(wide, targets, vec["advantages"].double(), vec["old_logprobs"].double(),
                                        vec["ref_logprobs"].double(), params)  # fmt: skip
        truth_grad = reference.token_backward(wide, targets, truth.row_max, truth.log_sum, truth.entropy,
                                              coefs[0].double(), coefs[1].double(), params.temperature)
        err, eager_err = max_error(grad, truth_grad), max_error(want_grad, truth_grad)
        assert err <= DOUBLE_BASELINE_FACTOR * eager_err + DOUBLE_BASELINE_ATOL, f"{what} d(logits): {err:.3g}"
    assert torch.isfinite(grad).all() and not grad[0, 0].any(), f"{what}: a masked row's gradient is exactly 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("parts", [1, 3], ids=["one-program-per-row", "split-rows"])
@pytest.mark.parametrize("vocab", [1001, 1003, 1024, 7])
def test_rows_of_any_vocabulary(vocab, parts, dtype):
    """Rows that start anywhere relative to 16 bytes (``logits[:, :-1]`` of an odd V): the
    head, the body of whole tiles, the tail of whole vectors and the last partial vector,
    with small tiles so that a row has several, in one program or split across three."""
    params = make_config(**CONFIGS["all-options"])
    logits3, targets, vec = make_rows(2, 3, vocab, dtype=dtype, temperature=params.temperature, seed=30)
    config = _kernels().launch_config(vocab, dtype)._replace(block_v=128, num_warps=1, bwd_block_v=128,
                                                             bwd_num_warps=1, parts=parts, bwd_parts=parts)
    _check_all(logits3, targets, vec, params, config, f"V={vocab} {dtype} parts={parts}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [50257, 32001])
def test_realistic_vocabularies_with_the_default_launch(vocab, dtype):
    """GPT-2's 50257 and 32001 logits per row with the launch the package makes: two rows
    are too few to fill a GPU, so each row is split across programs and combined."""
    params = make_config(**CONFIGS["all-options"])
    logits3, targets, vec = make_rows(1, 2, vocab, dtype=dtype, temperature=params.temperature, seed=32)
    config = _kernels().launch_config(vocab, dtype, rows=2)
    assert config.parts > 1
    _check_all(logits3, targets, vec, params, config, f"V={vocab} {dtype}")
    got, want = _forward_both(logits3, targets, vec, params)  # the registered op, its own launch
    _assert_token_results(got, want, f"V={vocab} {dtype} op")


# ----------------------------------------------------------------------------------
# Numerics at the edges (docs/contract.md, "Numerics")
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e4, -1e4, 1e30])
def test_large_offsets_match_the_fp64_truth(offset):
    """The row max is subtracted first: log-probs, entropy and the gradient lose nothing at
    any offset (x − (m + log s) would lose |m|·ulp: 1e-3 at 1e4, everything at 1e30)."""
    gen = torch.Generator().manual_seed(33)
    base = torch.randn(1, 4, 300, generator=gen)
    if offset == 1e30:  # neighbours of 1e30 (spaced by its ulp, 2^76): x − m is exact
        base = base.round().clamp(-8, 8) * 2.0**76
    logits3 = (base + offset).to(DEVICE)
    targets = torch.randint(0, 300, (4,), generator=gen).to(DEVICE)
    lp, entropy, row_max, log_sum = _ops().logprobs(logits3, targets, 1.0, True)[:4]
    wide = logits3.double().reshape(4, 300)
    log_p = torch.log_softmax(wide, -1)
    p = log_p.exp()
    truth_h = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    torch.testing.assert_close(lp.double(), log_p.gather(-1, targets[:, None]).squeeze(-1), **FP32)
    torch.testing.assert_close(entropy.double(), truth_h, **FP32)
    coef_logprob, coef_entropy = _coefficients(4, seed=34)
    grad = torch.empty_like(logits3)
    _ops().backward(logits3, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, 1.0, grad)
    one_hot = torch.nn.functional.one_hot(targets, 300).double()
    truth = coef_logprob.double()[:, None] * (one_hot - p) + coef_entropy.double()[:, None] * torch.where(
        p > 0, p * (log_p + truth_h[:, None]), torch.zeros_like(p))  # fmt: skip
    torch.testing.assert_close(grad.reshape(4, 300).double(), truth, **FP32)


def _per_token_case(logits3, targets, adv, old, ref, **options):
    params = make_config(has_old=old is not None, has_ref=ref is not None, **options)
    return _ops().forward(logits3, targets, adv, old, ref, params)


@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["clip", "dual-clip"])
@pytest.mark.parametrize("which", ["advantages", "old_logprobs", "ref_logprobs"])
def test_nan_per_token_inputs_reach_loss_and_gradient(which, dual_clip):
    """NaN at a valid row makes that row's loss and dlogp NaN (a NaN-dropping max or min would
    hide it); the other rows are untouched."""
    logits3, targets, vec = make_rows(1, 4, 50, seed=35)
    vec = {k: v.clone() for k, v in vec.items()}
    vec["advantages"][:] = torch.tensor([0.5, -0.5, 0.0, 2.0])
    vec[which][1:3] = float("nan")
    res = _per_token_case(logits3, targets, vec["advantages"], vec["old_logprobs"], vec["ref_logprobs"],
                          kl_coef=0.1, dual_clip=dual_clip)  # fmt: skip
    assert torch.isnan(res.loss[1:3]).all() and torch.isnan(res.dlogp[1:3]).all(), (res.loss, res.dlogp)
    assert torch.isfinite(res.loss[[0, 3]]).all() and torch.isfinite(res.dlogp[[0, 3]]).all()


def test_max_jump_between_tiles_keeps_entropy_finite():
    """The row max jumps from −1e36 to 1e36 at a tile boundary: the lanes rescale by 0 (not
    0·inf); the −1e36 logits have p = 0, the 384 others share the mass."""
    logits3 = torch.full((1, 2, 512), 1e36, device=DEVICE)
    logits3[..., :128] = -1e36
    targets = torch.tensor([511, 0], device=DEVICE)
    config = _kernels().launch_config(512, torch.float32)._replace(block_v=128, num_warps=1)
    outputs = tuple(torch.empty(2, device=DEVICE) for _ in KERNEL_FIELDS)
    from rlhf_fast.backends import ops

    call = ops.PPO_FORWARD.bind(logits3, targets, torch.ones(2, device=DEVICE), None, None, ratio_low=0.8,
                                ratio_high=1.2, dual_clip=0.0, kl_coef=0.0, kl_estimator=0, entropy_coef=0.0,
                                temperature=1.0)  # fmt: skip
    _kernels().ppo_forward(call, outputs, config=config)
    res = TokenResults(*outputs)
    torch.testing.assert_close(res.entropy, torch.full((2,), math.log(384.0), device=DEVICE))
    torch.testing.assert_close(res.logprobs, torch.tensor([-math.log(384.0), -2e36], device=DEVICE))
    assert torch.isfinite(res.row_max).all() and torch.isfinite(res.log_sum).all()
    grad = torch.empty_like(logits3)
    call = ops.PPO_BACKWARD.bind(logits3, targets, res.row_max, res.log_sum, res.entropy, torch.ones(2, device=DEVICE),
                                 torch.full((2,), 0.1, device=DEVICE), 1.0, grad)  # fmt: skip
    _kernels().ppo_backward(call, config=config)
    assert torch.isfinite(grad).all()
    assert (grad[0, 0, :128] == 0).all() and (grad[0, 1, 1:128] == 0).all(), "p = 0 below the jump"


def test_overflowing_ratio_gives_the_taken_branch():
    """log-ratio +100 (r = e^100 overflows fp32): a zero advantage contributes 0, a clipped
    one its clipped value, a dual-clipped one −c·A; none has a gradient, none a NaN."""
    logits3 = torch.zeros(1, 4, 2, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.long, device=DEVICE)
    old = torch.full((4,), math.log(0.5) - 100.0, device=DEVICE)
    adv = torch.tensor([0.0, 1.0, -1.0, -2.0], device=DEVICE)
    res = _per_token_case(logits3, targets, adv, old, None, clip_eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(res.pg, torch.tensor([0.0, -1.28, 3.0, 6.0], device=DEVICE))
    assert (res.dlogp == 0).all() and torch.isfinite(res.loss).all()


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
def test_overflowing_kl_with_zero_kl_coef_is_only_a_metric(estimator):
    """δ = ref − lp = 100: k3 = e^100 − 101 overflows; with β = 0 the loss and dlogp stay
    finite (0·δ, never 0·inf) while the KL itself reports inf."""
    logits3 = torch.zeros(1, 2, 2, device=DEVICE)
    targets = torch.zeros(2, dtype=torch.long, device=DEVICE)
    ref = torch.full((2,), math.log(0.5) + 100.0, device=DEVICE)
    res = _per_token_case(logits3, targets, torch.ones(2, device=DEVICE), None, ref, kl_coef=0.0,
                          kl_estimator=estimator, entropy_coef=0.01)  # fmt: skip
    assert torch.isinf(res.kl * torch.exp(res.kl_log_scale)).all()  # kl itself is stored times e^−kl_log_scale
    assert torch.isfinite(res.loss).all() and torch.isfinite(res.dlogp).all() and not res.log_scale.any()
    torch.testing.assert_close(res.loss, res.pg - 0.01 * res.entropy)


def test_bf16_gradients_round_to_nearest_even():
    """The kernels' fp32 → bf16 store rounds to nearest, ties to even, like ``Tensor.to``
    (the interpreter's own cast would truncate): ties, overflow to inf, NaN, denormals."""
    import triton
    import triton.language as tl

    # Module globals: kernels see globals, not closures (in the interpreter too).
    from rlhf_fast.kernels.row_gradient import _to_output

    globals().update(tl=tl, _to_output=_to_output)

    @triton.jit
    def store(src_ptr, dst_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(dst_ptr + offs, _to_output(tl.load(src_ptr + offs), dst_ptr.dtype.element_ty))  # noqa: F821

    ulp = 2.0**-8  # of bf16 at 1.0
    values = [1.0 + ulp / 2, 1.0 + 3 * ulp / 2, 1.0 + ulp / 2 + 2**-20, -(1.0 + ulp / 2), 1.0 - ulp / 4,
              3.3961e38, 3.4e38, float("inf"), float("-inf"), float("nan"), 1e-39, -1e-40, 0.0, -0.0, 1e30]
    gen = torch.Generator().manual_seed(36)
    src = torch.cat([torch.tensor(values), torch.randn(128 - len(values), generator=gen) * 100]).to(DEVICE)
    dst = torch.empty(128, dtype=torch.bfloat16, device=DEVICE)
    store[(1,)](src, dst, N=128)
    want = src.to(torch.bfloat16)
    same = (dst.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(dst) & torch.isnan(want))
    assert same.all(), (src[~same], dst[~same], want[~same])


def test_exact_division_sequence_is_correctly_rounded():
    """x = l / τ as the compiled kernels compute it: q = l·fp32(1/τ), then
    fma(fma(−q, τ, l), 1/τ, q), equals the true fp32 division for every bf16 logit (and the
    interpreter divides). Checked with exact arithmetic: the remainder is an fp32 number and
    the corrected quotient rounds once (fp64 sums, ties re-checked exactly)."""
    from fractions import Fraction

    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    logits = bits.view(torch.bfloat16).float()
    logits = logits[torch.isfinite(logits) & (logits.abs() > 1e-30) & (logits.abs() < 1e37)]
    for tau in (0.7, 1.3, 0.3, 2.0, 0.6, 1.1, 0.9, 0.95, 1.0, 0.123456):
        tau32 = torch.tensor(tau, dtype=torch.float32)
        inv = torch.ones((), dtype=torch.float32) / tau32
        q = logits * inv
        remainder = logits.double() - q.double() * tau32.double()  # exact: a 48-bit product, then Sterbenz
        assert torch.equal(remainder.float().double(), remainder)
        corrected = q.double() + remainder * inv.double()
        got = corrected.float()
        up = torch.nextafter(got, torch.full_like(got, float("inf")))
        down = torch.nextafter(got, torch.full_like(got, float("-inf")))
        ties = ((corrected - got.double()).abs() * 2 == (up.double() - got.double()).abs()) | (
            (corrected - got.double()).abs() * 2 == (got.double() - down.double()).abs())  # fmt: skip
        for i in ties.nonzero().flatten().tolist():  # fp64 may have rounded onto a tie: decide exactly
            exact = Fraction(q[i].item()) + Fraction(remainder[i].item()) * Fraction(inv.item())
            near = min((got[i], up[i], down[i]), key=lambda v: (abs(Fraction(v.item()) - exact),
                                                               int(v.view(torch.int32)) & 1))  # fmt: skip
            got[i] = near
        assert torch.equal(got, logits / tau32), f"τ = {tau}"


def test_inplace_gradient_into_overlapping_logits_is_refused():
    """An expanded tensor's rows share memory: writing the gradient in place would race."""
    logits3 = torch.randn(1, 1, 129, device=DEVICE).expand(2, 3, 129)
    targets = torch.zeros(6, dtype=torch.long, device=DEVICE)
    row_max, log_sum, entropy = (torch.zeros(6, device=DEVICE) for _ in range(3))
    coef = torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="logits:.*share memory"):
        _ops().backward(logits3, targets, row_max, log_sum, entropy, coef, coef, 1.0, logits3)


# ----------------------------------------------------------------------------------
# The gradient in the forward (one read of the logits)
# ----------------------------------------------------------------------------------


def _triton_backend():
    from rlhf_fast.backends import triton as triton_backend

    return triton_backend


def _two_kernels(logits3, targets, vec, params, weights):
    res = _ops().forward(logits3, targets, vec["advantages"], vec["old_logprobs"], vec["ref_logprobs"], params)
    grad = torch.empty_like(logits3)
    _ops().backward(logits3, targets, res.row_max, res.log_sum, res.entropy, weights * res.dlogp,
                    weights * params.entropy_coef, params.temperature, grad)  # fmt: skip
    return res, grad


GRAD_IN_FORWARD = {
    "fp32-V1000": dict(shape=(2, 3, 1000), strided=False),
    "fp32-V1024-strided-tau": dict(shape=(2, 3, 1024), temperature=0.7),
    "bf16-V1024-strided": dict(shape=(2, 3, 1024), dtype=torch.bfloat16),
    "bf16-V520-tau": dict(shape=(1, 4, 520), dtype=torch.bfloat16, strided=False, temperature=1.3),
    "fp32-banned": dict(shape=(2, 2, 512), strided=False, banned_tokens=100),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("case_name", list(GRAD_IN_FORWARD))
def test_forward_with_grad_matches_forward_then_backward(case_name, inplace):
    spec = dict(GRAD_IN_FORWARD[case_name])
    temperature = spec.pop("temperature", 1.0)
    logits3, targets, vec = make_rows(*spec.pop("shape"), temperature=temperature, seed=37, **spec)
    params = make_config(**dict(CONFIGS["all-options"], temperature=temperature))
    rows = targets.numel()
    weights = torch.rand(rows, generator=torch.Generator().manual_seed(38)).to(DEVICE) / rows
    weights[0] = 0.0  # a masked row: exact zeros, even from junk logits
    logits3[0, 0] = float("nan")
    assert _kernels().forward_grad_applies(logits3, logits3 if inplace else torch.empty_like(logits3))
    want, want_grad = _two_kernels(logits3, targets, vec, params, weights)
    source = logits3.clone()
    out = logits3 if inplace else torch.full_like(logits3, float("nan"))
    got = _triton_backend().forward_with_grad(logits3, targets, vec["advantages"], vec["old_logprobs"],
                                              vec["ref_logprobs"], params, weights, out)  # fmt: skip
    masked = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    masked[0] = True
    for name, g, w in zip(KERNEL_FIELDS, got, want):  # the NaN row agrees in NaN-ness
        torch.testing.assert_close(g[~masked], w[~masked], **FP32, msg=lambda m, n=name: f"{case_name} {n}: {m}")
    grad, want_grad = out.reshape(rows, -1), want_grad.reshape(rows, -1)
    assert (grad[0] == 0).all()
    if logits3.dtype == torch.float32:
        torch.testing.assert_close(grad[1:], want_grad[1:], **FP32)
    else:  # one bf16 rounding of nearly equal fp32 values: at most one bf16 ulp apart
        diff = (grad[1:].float() - want_grad[1:].float()).abs()
        assert (diff <= want_grad[1:].float().abs() * 2.0**-7).all()
    if not inplace:  # the logits are only read
        assert torch.equal(torch.isnan(logits3), torch.isnan(source))
        assert torch.equal(logits3.nan_to_num(), source.nan_to_num())


@pytest.mark.parametrize("case_name", ["odd-vocabulary", "fp16"])
def test_forward_with_grad_falls_back_to_two_kernels(case_name):
    """Rows that are not 16-byte aligned, or fp16 rows, run forward + backward: same results."""
    dtype = torch.float16 if case_name == "fp16" else torch.float32
    vocab = 1024 if case_name == "fp16" else 1001
    logits3, targets, vec = make_rows(2, 3, vocab, dtype=dtype, seed=39)
    params = make_config(**CONFIGS["all-options"])
    weights = torch.full((6,), 1.0 / 6, device=DEVICE)
    out = torch.empty_like(logits3)
    assert not _kernels().forward_grad_applies(logits3, out)
    got = _triton_backend().forward_with_grad(logits3, targets, vec["advantages"], vec["old_logprobs"],
                                              vec["ref_logprobs"], params, weights, out)  # fmt: skip
    want, want_grad = _two_kernels(logits3, targets, vec, params, weights)
    for name, g, w in zip(KERNEL_FIELDS, got, want):
        assert torch.equal(g, w), name
    assert torch.equal(out, want_grad)


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
    """The contract's accuracy for bf16/fp16: error vs fp64 truth ≤ 2× the eager reference's own + 1e-6."""
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
    lp, entropy, _, _ = _ops().logprobs(logits3, targets, 0.7, True)[:4]
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


def _compiled_variants() -> int:
    """Compiled variants of every kernel of the module."""
    from rlhf_fast.kernels import ppo_loss as kernels

    total = 0
    for name in dir(kernels):
        caches = getattr(getattr(kernels, name), "device_caches", None)
        if name.endswith("_kernel") and caches is None:
            pytest.skip("this triton has no JITFunction.device_caches to count compiled variants")
        if name.endswith("_kernel"):
            total += sum(len(entry[0]) for entry in caches.values())
    return total


@cuda
@needs_cuda
@pytest.mark.parametrize("rows", [(2, 4), (64, 32)], ids=["split-rows", "one-program-per-row"])
def test_cuda_no_recompilation_for_new_shapes_or_hyperparameters(rows):
    cfg = make_config(**CONFIGS["all-options"])
    logits3, targets, vec = make_rows(*rows, 32000, dtype=torch.bfloat16, seed=18)
    _forward_both(logits3, targets, vec, cfg)
    before = _compiled_variants()
    assert before > 0
    other = dict(CONFIGS["all-options"], clip_eps=0.1, clip_eps_high=0.3, dual_clip=4.0, kl_coef=0.3,
                 entropy_coef=0.05, temperature=1.1)
    logits3, targets, vec = make_rows(rows[0] + 1, rows[1] + 3, 50272, dtype=torch.bfloat16, seed=19)
    _forward_both(logits3, targets, vec, make_config(**other))
    assert _compiled_variants() == before


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_public_api_double_baseline(dtype, use_backend):
    """``rf.ppo_loss`` end to end in low precision, V = 32000 (the double baseline)."""
    case = make_case(4, 16, 32000, dtype=dtype, strided=True, seed=20, device=DEVICE)
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.9, dual_clip=3.0)
    truth = outputs_dict(*run_loss(case, "eager", logits_dtype=torch.float64, **options))
    eager = outputs_dict(*run_loss(case, "eager", **options))
    fused = outputs_dict(*run_loss(case, use_backend("triton"), **options))
    assert_double_baseline(fused, eager, truth, what=str(dtype))


if TRITON_INTERPRETED:
    # The interpreter evaluates both sides of tl.where, including the 0·(−inf) it guards.
    pytestmark = [pytestmark, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
