"""The C++ CPU backend (issue 3): its row ops against the closed-form reference, low
precision against fp64 truth, thread-count independence, every instruction-set build,
torch.compile tracing, and the error when it is not built.

The option grid over the public API lives in test_ppo_loss_grid.py (cpp is one of its
backends); this file checks what is specific to the extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import HAS_CPP
from helpers import TOLERANCES, assert_double_baseline, make_case, make_config, max_error, outputs_dict, run_loss

import rlhf_fast as rf
from rlhf_fast import backends
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
    for name in want._fields:
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
    lp, entropy, _, _ = _ops().logprobs(logits, targets, 0.8, with_entropy)
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
    with pytest.raises(RuntimeError, match="partially overlaps"):
        _ops().backward(buffer[:, :3], targets, torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3),
                        torch.zeros(3), 1.0, buffer[:, 1:])


# ---------------------------------------------------------------------------------------
# bf16 / fp16: the double baseline of SPEC §7 through the public API
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


@needs_cpp
@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_every_isa_build_matches_reference(capability):
    """Each kernel build, chosen with ATEN_CPU_CAPABILITY in a subprocess, meets SPEC §7."""
    script = textwrap.dedent(
        """
        import sys, torch
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
        """
    ).format(tests=os.path.dirname(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = proc.stdout.split()[0]
    if ran != capability:  # ATen never picks an ISA the CPU lacks
        pytest.skip(f"this CPU runs the {ran} build when asked for {capability}")


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
