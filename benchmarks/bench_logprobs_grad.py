"""Differentiable log-probs and entropy: ``rf.logprobs`` and ``rf.fused_linear_logprobs`` with grad,
against the eager path that TRL and verl run today, same inputs, same run (CPU, fp32).

Run: ``pytest benchmarks/bench_logprobs_grad.py`` (pytest-benchmark; the end of the run says how
many times faster than the eager path each one was, and its memory against the eager path's;
``-s`` also prints every number of ``extra_info``). Two benchmarks:

* ``test_cpu_logprobs_grad_vs_peer_eager``: logits ``[8, N/8, V]`` (a leaf with grad), then
  (lp, H) and a caller's loss on them, L = −mean(A·lp) − η·mean(H) (η = 0.01: a policy
  gradient with an entropy bonus), forward + backward into a fresh ``logits.grad``.
  ``rf.logprobs(..., with_entropy=True, backend="cpp")`` against :func:`peer_eager_logprobs_entropy`.
* ``test_cpu_fused_linear_logprobs_memory_flat``: hidden ``[N, H]`` and LM head ``[V, H]`` (leaves
  with grad), the same loss, forward + backward; ``rf.fused_linear_logprobs(..., backend="cpp")``
  at several N. Its peak memory above the inputs must not grow with N but for d(hidden) (N·H·4
  bytes, the size of an input) and O(N) per-token vectors. The eager path (``hidden @ W.T`` to
  full logits, then :func:`peer_eager_logprobs_entropy`) is measured at the same N to show what
  grows.

The "peer eager" path is what TRL 1.16 runs on a CPU (``selective_log_softmax_and_entropy`` in
``trl.trainer.utils``, whose Triton kernel is CUDA/XPU-only; ``test_peer_eager_is_trls_cpu_path``
checks value and gradient against TRL itself): the target logit by ``gather`` minus a logsumexp
taken one leading index at a time (also verl's ``logprobs_from_logits_v2`` for fp32), and the
entropy as −Σ p·log p from ``log_softmax`` over blocks of 128 rows, with autograd through both.

The bars, asserted in every run (``bars.py``): the logits form ≥ 5× faster than the peer eager
path, with ≤ 0.3× its extra memory (the peak above the inputs less ``logits.grad``, N·V·4 bytes,
which both paths must return; the peak ratio with ``logits.grad`` counted is reported too, and
cannot fall below grad / (grad + the peer's extra)); the fused-linear form's memory flat in N
(below). Shapes: ``RLHF_FAST_BENCH_FULL=1`` runs the bar shapes, N = 4096, V = 32000 for the
logits form and N ∈ {1024, 2048, 4096, 8192}, H = 256, V = 32000 for the fused-linear form; by
default (CI) N = 512 (5 rounds) and N ∈ {256, 512}.

Time: interleaved rounds of the two paths (``bars.interleaved``; with timing on, pytest-benchmark
times the rlhf_fast path and the peer eager path runs in its untimed ``setup``), so the two share
the machine's noise. Medians of both go to ``extra_info``.

Peak memory above the inputs (``machine.py``): each path runs one step in a fresh subprocess;
the peak-RSS counter is reset once the inputs exist, and VmHWM minus the RSS at the reset is
the number, with glibc serving allocations above 64 KiB by mmap. It includes the gradients of
the inputs (``logits.grad``: N·V·4 bytes; ``hidden.grad`` and ``weight.grad``) for every path.

Flatness (fused-linear): with d(hidden) = N·H·4 bytes taken out, the peak at the largest N may
exceed the one at the smallest by at most ``FLAT_SLACK_BYTES`` + ``FLAT_BYTES_PER_TOKEN`` per
extra token (64 fp32 vectors: generous for the per-token statistics and coefficients), where
one more fp32 [N, V] tensor would add V·4 = 128000 bytes per token.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

import bars
import pytest
import torch
import torch.nn.functional as F
from bars import assert_bars, at_least, at_most
from machine import cpu_name, peak_in_fresh_process, print_peak
from versus_eager import memory_vs_eager, times_faster

import rlhf_fast as rf
from rlhf_fast import backends

FULL = os.environ.get("RLHF_FAST_BENCH_FULL", "0") == "1"
LOGITS_SHAPE = dict(n=4096 if FULL else 512, v=32000)
LINEAR_ROWS = (1024, 2048, 4096, 8192) if FULL else (256, 512)
EAGER_LINEAR_ROWS = LINEAR_ROWS if FULL else LINEAR_ROWS[-1:]  # each takes a fresh process: keep the smoke run short
LINEAR_SHAPE = dict(h=256, v=32000)
ROUNDS = 5
LINEAR_ROUNDS = 3 if FULL else 2
ENTROPY_COEF = 0.01
BARS = {"speedup": 5.0, "memory_ratio": 0.3}
FLAT_SLACK_BYTES = 4 * 2**20
FLAT_BYTES_PER_TOKEN = 64 * 4
BYTES_PER_VALUE = 4  # fp32
PEER_ENTROPY_BLOCK = 128  # rows per log_softmax block in TRL's entropy_from_logits

HAS_CPP = backends.load_ops("cpp")[0] is not None
pytestmark = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension not built: {backends.load_ops('cpp')[1]}")


# ----------------------------------------------------------------------------------
# The paths
# ----------------------------------------------------------------------------------


def peer_eager_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor):
    """(lp, H) of fp32 logits ``[B, T, V]`` the way TRL's CPU path computes them, differentiable.

    lp: the target's logit minus the row's logsumexp, the logsumexp formed for one leading index
    at a time (TRL's ``selective_log_softmax`` and verl's ``logprobs_from_logits_v2``, fp32 branch).
    H: −Σ p·log p with log p from ``log_softmax``, over blocks of 128 flattened rows (TRL's
    ``entropy_from_logits``). Autograd keeps each block's log p and p for the backward.
    """
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_norm = torch.stack([torch.logsumexp(rows, dim=-1) for rows in logits])
    logprobs = target_logit - log_norm
    blocks = []
    for block in logits.reshape(-1, logits.shape[-1]).split(PEER_ENTROPY_BLOCK):
        log_p = F.log_softmax(block, dim=-1)
        blocks.append(-(log_p.exp() * log_p).sum(-1))
    return logprobs, torch.cat(blocks).view(targets.shape)


def caller_loss(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """What a trainer writes on the per-token tensors: a policy gradient with an entropy bonus."""
    return -(advantages * logprobs).mean() - ENTROPY_COEF * entropy.mean()


def make_logits_inputs(n: int, v: int):
    """logits [8, n/8, v] (leaf with grad), targets and advantages [8, n/8]."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, n // 8)
    logits = (torch.randn(*shape, v, generator=gen) * 2.0).requires_grad_(True)
    return logits, torch.randint(0, v, shape, generator=gen), torch.randn(shape, generator=gen)


def make_linear_inputs(n: int, h: int, v: int):
    """hidden [8, n/8, h], weight [v, h] (leaves with grad), targets and advantages [8, n/8]."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, n // 8)
    hidden = torch.randn(*shape, h, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_(True)
    return hidden, weight, torch.randint(0, v, shape, generator=gen), torch.randn(shape, generator=gen)


def logits_step(path: str, logits, targets, advantages) -> None:
    """One forward + backward of the caller's loss; the gradient lands in a fresh ``logits.grad``."""
    logits.grad = None
    if path == "peer-eager":
        lp, entropy = peer_eager_logprobs_entropy(logits, targets)
    else:
        lp, entropy = rf.logprobs(logits, targets, with_entropy=True, backend=path)
    caller_loss(lp, entropy, advantages).backward()


def linear_step(path: str, hidden, weight, targets, advantages) -> None:
    """The same from hidden states and the LM head; gradients land in fresh ``hidden.grad`` / ``weight.grad``."""
    hidden.grad = weight.grad = None
    if path == "peer-eager":
        lp, entropy = peer_eager_logprobs_entropy(hidden @ weight.T, targets)
    else:
        lp, entropy = rf.fused_linear_logprobs(hidden, weight, targets, with_entropy=True, backend=path)
    caller_loss(lp, entropy, advantages).backward()


MAKERS = {"logits": make_logits_inputs, "linear": make_linear_inputs}
STEPS = {"logits": logits_step, "linear": linear_step}


def measure_peak_memory(form: str, path: str, *shape: int):
    """Bytes above the inputs at the peak of one step in a fresh process, or None without /proc."""
    return peak_in_fresh_process(__file__, ["--memory", form, path, *shape])


def interleaved(benchmark, step, inputs, ours: str, rounds: int, warm: bool = False):
    """Medians (peer eager, ours) of ``rounds`` interleaved runs, after one warm-up of each unless ``warm``."""
    if not warm:
        step(ours, *inputs)
        step("peer-eager", *inputs)
    times = bars.interleaved(benchmark, {path: (lambda p=path: step(p, *inputs)) for path in ("peer-eager", ours)},
                             ours, rounds)
    return statistics.median(times["peer-eager"]), statistics.median(times[ours]), len(times[ours])


def summary(name: str, eager_s: float, ours_s: float, runs: int, eager_bytes=None, ours_bytes=None) -> str:
    """The line conftest.py prints: speed and memory against the peer eager path of the same run."""
    how = "one run each, timing off: indicative only" if runs == 1 else f"medians of {runs} interleaved runs"
    speed = times_faster(eager_s, ours_s).replace("than eager", "than the peer eager path (TRL's CPU path)")
    parts = [f"{name} {speed} ({ours_s:.3g} s vs {eager_s:.3g} s, {how})"]
    memory = memory_vs_eager(eager_bytes, ours_bytes).replace("eager's", "the peer eager path's")
    if memory:
        parts.append(memory)
    return "; ".join(parts)


def machine_info() -> dict:
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "kernel_isa": torch.ops.rlhf_fast.cpu_capability(), "load_average_1min": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------
# The benchmarks
# ----------------------------------------------------------------------------------


def test_peer_eager_is_trls_cpu_path():
    """The baseline is what it claims: TRL's own CPU path gives the same values and gradient."""
    from trl.trainer.utils import selective_log_softmax_and_entropy

    logits, targets, advantages = make_logits_inputs(64, 300)
    ours_lp, ours_h = peer_eager_logprobs_entropy(logits, targets)
    (ours_grad,) = torch.autograd.grad(caller_loss(ours_lp, ours_h, advantages), logits)
    trl_lp, trl_h = selective_log_softmax_and_entropy(logits, targets)
    (trl_grad,) = torch.autograd.grad(caller_loss(trl_lp, trl_h, advantages), logits)
    for ours, theirs in ((ours_lp, trl_lp), (ours_h, trl_h), (ours_grad, trl_grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_cpu_logprobs_grad_vs_peer_eager(benchmark):
    n, v = LOGITS_SHAPE["n"], LOGITS_SHAPE["v"]
    memory = {path: measure_peak_memory("logits", path, n, v) for path in ("peer-eager", "cpp")}
    inputs = make_logits_inputs(n, v)
    # the two paths compute the same thing (a sanity check of the benchmark, not the accuracy test; also the warm-up)
    grads = {}
    for path in ("peer-eager", "cpp"):
        logits_step(path, *inputs)
        grads[path] = inputs[0].grad
    torch.testing.assert_close(grads["cpp"], grads["peer-eager"], rtol=1e-4, atol=1e-7)
    del grads
    benchmark.group = f"CPU logprobs+entropy with grad N={n} V={v} fp32 fwd+bwd"
    load_before = os.getloadavg()[0]
    eager_s, cpp_s, runs = interleaved(benchmark, logits_step, inputs, "cpp", ROUNDS, warm=True)
    info = {**machine_info(), "load_average_1min": [load_before, os.getloadavg()[0]],
            "shape": f"[8, {n // 8}, {v}] fp32", "peer_eager_median_s": eager_s, "cpp_median_s": cpp_s,
            "speedup": eager_s / cpp_s}
    if memory["cpp"] is not None:
        grad_bytes = n * v * 4  # logits.grad, the result both paths must return
        extra = {path: memory[path] - grad_bytes for path in memory}
        info.update(peer_eager_peak_above_inputs_MiB=memory["peer-eager"] / 2**20,
                    cpp_peak_above_inputs_MiB=memory["cpp"] / 2**20,
                    peak_ratio_with_input_grad=memory["cpp"] / memory["peer-eager"],
                    peer_eager_extra_MiB=extra["peer-eager"] / 2**20, cpp_extra_MiB=extra["cpp"] / 2**20,
                    memory_ratio=max(extra["cpp"], 0) / extra["peer-eager"])
    info["vs_eager"] = summary("rf.logprobs (cpp)", eager_s, cpp_s, runs, memory["peer-eager"], memory["cpp"])
    if "memory_ratio" in info:
        info["vs_eager"] += (f"; extra memory (above the inputs and logits.grad) {info['memory_ratio']:.3f}× the peer "
                             f"eager path's ({info['cpp_extra_MiB']:.0f} vs {info['peer_eager_extra_MiB']:.0f} MiB)")
    checks = [at_least("speed-up over the peer eager path", info["speedup"], BARS["speedup"]),
              at_most("extra memory over the peer eager path's", info.get("memory_ratio", math.nan),
                      BARS["memory_ratio"])]  # NaN (a failed bar) without Linux's /proc
    info["vs_eager"] += "; " + bars.summary(checks)
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
    assert_bars(checks, f"rf.logprobs with grad, {info['shape']}")


def _slope(xs, ys) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def test_cpu_fused_linear_logprobs_memory_flat(benchmark):
    h, v = LINEAR_SHAPE["h"], LINEAR_SHAPE["v"]
    fused = {n: measure_peak_memory("linear", "cpp", n, h, v) for n in LINEAR_ROWS}
    eager = {n: measure_peak_memory("linear", "peer-eager", n, h, v) for n in EAGER_LINEAR_ROWS}
    n_max = LINEAR_ROWS[-1]
    inputs = make_linear_inputs(n_max, h, v)
    benchmark.group = f"CPU fused-linear logprobs+entropy with grad N={n_max} H={h} V={v} fp32 fwd+bwd"
    load_before = os.getloadavg()[0]
    eager_s, fused_s, runs = interleaved(benchmark, linear_step, inputs, "cpp", LINEAR_ROUNDS)
    info = {**machine_info(), "load_average_1min": [load_before, os.getloadavg()[0]],
            "shape": f"N in {list(LINEAR_ROWS)}, H={h}, V={v} fp32 (timed at N={n_max})",
            "peer_eager_median_s": eager_s, "fused_median_s": fused_s, "speedup": eager_s / fused_s}
    line = summary(f"rf.fused_linear_logprobs (cpp) at N={n_max}", eager_s, fused_s, runs, eager[n_max],
                   fused[n_max])
    if fused[n_max] is not None:
        d_hidden = {n: n * h * BYTES_PER_VALUE for n in LINEAR_ROWS}
        rest = {n: fused[n] - d_hidden[n] for n in LINEAR_ROWS}
        growth = rest[n_max] - rest[LINEAR_ROWS[0]]
        allowed = FLAT_SLACK_BYTES + FLAT_BYTES_PER_TOKEN * (n_max - LINEAR_ROWS[0])
        info.update(
            fused_peak_above_inputs_MiB={n: fused[n] / 2**20 for n in LINEAR_ROWS},
            fused_peak_less_d_hidden_MiB={n: rest[n] / 2**20 for n in LINEAR_ROWS},
            peer_eager_peak_above_inputs_MiB={n: eager[n] / 2**20 for n in eager},
            fused_bytes_per_token=_slope(LINEAR_ROWS, [fused[n] for n in LINEAR_ROWS]),
            peer_eager_bytes_per_token=(_slope(list(eager), list(eager.values())) if len(eager) > 1
                                        else eager[n_max] / n_max),
            d_hidden_bytes_per_token=h * BYTES_PER_VALUE, one_fp32_logits_row_bytes=v * BYTES_PER_VALUE,
            growth_less_d_hidden_MiB=growth / 2**20, allowed_growth_MiB=allowed / 2**20,
        )
        peaks = ", ".join(f"N={n}: {fused[n] / 2**20:.0f}" for n in LINEAR_ROWS)
        eager_how = "" if len(eager) > 1 else ", its peak over N"
        line += (f"; fused peak above the inputs {peaks} MiB: {info['fused_bytes_per_token']:.0f} bytes per token "
                 f"(d(hidden) alone {h * BYTES_PER_VALUE}; the peer eager path "
                 f"{info['peer_eager_bytes_per_token']:.0f}{eager_how}), growth beyond d(hidden) "
                 f"{growth / 2**20:.1f} MiB (allowed {allowed / 2**20:.1f})")
    checks = [at_most("peak growth beyond d(hidden), MiB", growth / 2**20 if fused[n_max] is not None else math.nan,
                      allowed / 2**20 if fused[n_max] is not None else 0.0)]  # NaN (failed) without /proc
    info["vs_eager"] = line + "; " + bars.summary(checks)
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
    assert_bars(checks, f"rf.fused_linear_logprobs memory flat in N, {info['shape']}")


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "--memory":
    _form, _path = sys.argv[2], sys.argv[3]
    _inputs = MAKERS[_form](*map(int, sys.argv[4:]))
    print_peak(lambda: STEPS[_form](_path, *_inputs))
