"""The C++ CPU backend vs the eager reference, same inputs, same run.

Run: ``pytest benchmarks/bench_cpu.py`` (pytest-benchmark; the end of the run says how many
times faster than eager the C++ path was, and its memory against eager's; ``-s`` also prints
every number of ``extra_info``). Two workloads, fp32 logits
``[8, N/8, V]`` with V = 32000:

* ``rf.ppo_loss`` forward + backward with every option on: clip (ε = 0.2, ε_high = 0.28,
  dual clip c = 3), k3 KL to reference log-probs (β = 0.05), entropy bonus (η = 0.01),
  old log-probs, token-mean; the gradient lands in a fresh ``logits.grad`` each step;
* ``rf.logprobs(..., with_entropy=True)`` (the no-grad pass for old/ref log-probs).

The C++ backend's bars: fwd+bwd ≥ 4× faster than eager with peak memory above the inputs
≤ 0.45× eager's; logprobs ≥ 3× faster. They are asserted in every run (``bars.py``). The bar
shape N = 4096 holds ~0.5 GiB of logits and the eager reference needs several more [N, V]
fp32 tensors and ~10 s a step on 2 cores, so it runs only with ``RLHF_FAST_BENCH_FULL=1``
(3 rounds); by default (CI) N = 512, 5 rounds, seconds in all.

Time: interleaved rounds of the eager and C++ paths (``bars.interleaved``; with timing on,
pytest-benchmark times the C++ path and the eager path runs in its untimed ``setup``), so
the two share the machine's noise; medians of both and their ratio go to ``extra_info``.

Peak memory above the inputs: each path runs once in a fresh subprocess. After the inputs
are built the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``);
peak RSS (VmHWM) after one step minus the RSS before it is the number. glibc serves every
allocation above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
RSS rather than being reused silently from the heap. It includes ``logits.grad`` (N·V·4
bytes) for both paths. (Linux only; reported as absent elsewhere.)

Bytes and exp model of the C++ kernels (what they must move and compute, s = 4 bytes):
forward reads the logits once (N·V·s) and takes one exp per logit; backward reads them
again, writes d(logits) (2·N·V·s) and takes one exp per logit; so fwd+bwd moves 3·N·V·s
bytes with 2·N·V exps, logprobs N·V·s bytes with N·V exps (per-row vectors are
negligible). Achieved GB/s and exp/s are compared with the machine's, measured in the same
run: ``Tensor.copy_`` of an [N, V] fp32 tensor (2·N·V·s bytes: the copy bandwidth) and
``torch.exp(out=)`` over it (ATen's vectorised exp streaming through memory).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from functools import cache

import pytest
import torch
from bars import assert_bars, at_least, at_most, interleaved, summary
from machine import cpu_name, peak_in_fresh_process, print_peak
from versus_eager import line

import rlhf_fast as rf
from rlhf_fast import backends

FULL = os.environ.get("RLHF_FAST_BENCH_FULL", "0") == "1"
SHAPE = dict(n=4096 if FULL else 512, v=32000)
ROUNDS = 3 if FULL else 5
LOSS_OPTIONS = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3",
                    entropy_coef=0.01)
BARS = {"ppo_fwd_bwd_speedup": 4.0, "ppo_memory_ratio": 0.45, "logprobs_speedup": 3.0}
BYTES_PER_LOGIT = 4  # fp32

HAS_CPP = backends.load_ops("cpp")[0] is not None
pytestmark = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension not built: {backends.load_ops('cpp')[1]}")


def make_inputs(n: int, v: int):
    """logits [8, n/8, v] (leaf with grad), targets, advantages, old/ref log-probs [8, n/8]."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, n // 8)
    logits = (torch.randn(*shape, v, generator=gen) * 2.0).requires_grad_(True)
    targets = torch.randint(0, v, shape, generator=gen)
    advantages = torch.randn(shape, generator=gen)
    old = -torch.rand(shape, generator=gen) * 10.0 - 5.0
    ref = old + 0.1 * torch.randn(shape, generator=gen)
    return logits, targets, advantages, old, ref


def ppo_step(backend: str, logits, targets, advantages, old, ref) -> None:
    out = rf.ppo_loss(logits, targets, advantages, old, ref, backend=backend, **LOSS_OPTIONS)
    out.loss.backward()
    logits.grad = None  # the next step allocates a fresh gradient, as after zero_grad()


def logprobs_step(backend: str, logits, targets, *_unused) -> None:
    rf.logprobs(logits.detach(), targets, with_entropy=True, backend=backend)


WORKLOADS = {"ppo": ppo_step, "logprobs": logprobs_step}


# ----------------------------------------------------------------------------------
# Peak RSS above the inputs, one path per fresh subprocess.
# ----------------------------------------------------------------------------------


def measure_peak_memory(workload: str, backend: str, n: int, v: int):
    """Bytes above the inputs at the peak of one step, or None where /proc is missing."""
    return peak_in_fresh_process(__file__, ["--memory", workload, backend, n, v])


# ----------------------------------------------------------------------------------
# The machine's own limits, measured in the same run.
# ----------------------------------------------------------------------------------


@cache
def machine_limits(n: int, v: int):
    src = torch.randn(n, v)
    dst = torch.empty_like(src)

    def median_time(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    copy_s = median_time(lambda: dst.copy_(src))
    exp_s = median_time(lambda: torch.exp(src, out=dst))
    return {
        "copy_GBps": 2 * src.numel() * BYTES_PER_LOGIT / copy_s / 1e9,
        "torch_exp_Gexp_per_s": src.numel() / exp_s / 1e9,
    }


def _run(benchmark, workload: str, passes: int):
    """Interleaved eager / cpp rounds; extra_info with medians, ratios, memory, GB/s."""
    n, v = SHAPE["n"], SHAPE["v"]
    step = WORKLOADS[workload]
    memory = {b: measure_peak_memory(workload, b, n, v) for b in ("eager", "cpp")}
    inputs = make_inputs(n, v)
    step("cpp", *inputs)  # warm-up
    step("eager", *inputs)
    load_before = os.getloadavg()[0]
    benchmark.group = f"CPU {workload} N={n} V={v} fp32"
    times = interleaved(benchmark, {b: (lambda b=b: step(b, *inputs)) for b in ("eager", "cpp")}, "cpp", ROUNDS)
    eager_s, cpp_s = statistics.median(times["eager"]), statistics.median(times["cpp"])
    limits = machine_limits(n, v)
    logits_bytes = n * v * BYTES_PER_LOGIT
    info = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "kernel_isa": torch.ops.rlhf_fast.cpu_capability(),
        "shape": f"N={n} V={v} fp32",
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "eager_median_s": eager_s,
        "cpp_median_s": cpp_s,
        "speedup": eager_s / cpp_s,
        "cpp_GBps": passes * logits_bytes / cpp_s / 1e9,
        "cpp_Gexp_per_s": (2 if workload == "ppo" else 1) * n * v / cpp_s / 1e9,
        **limits,
    }
    info["cpp_fraction_of_copy_bandwidth"] = info["cpp_GBps"] / limits["copy_GBps"]
    if memory["eager"] is not None:
        info["eager_peak_above_inputs_MiB"] = memory["eager"] / 2**20
        info["cpp_peak_above_inputs_MiB"] = memory["cpp"] / 2**20
        info["memory_ratio"] = memory["cpp"] / memory["eager"]
    info["vs_eager"] = line("cpp", eager_s, cpp_s, len(times["cpp"]), memory["eager"], memory["cpp"])
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
    return info


def _check(benchmark, info, bars) -> None:
    benchmark.extra_info["vs_eager"] += "; " + summary(bars)
    assert_bars(bars, f"C++ backend, {info['shape']}")


def test_cpu_ppo_loss_fwd_bwd(benchmark):
    info = _run(benchmark, "ppo", passes=3)
    memory_ratio = info.get("memory_ratio", math.nan)  # NaN (a failed bar) without Linux's /proc
    _check(benchmark, info, [at_least("fwd+bwd speed-up over eager", info["speedup"], BARS["ppo_fwd_bwd_speedup"]),
                             at_most("fwd+bwd peak memory over eager's", memory_ratio, BARS["ppo_memory_ratio"])])


def test_cpu_logprobs_with_entropy(benchmark):
    info = _run(benchmark, "logprobs", passes=1)
    _check(benchmark, info, [at_least("logprobs speed-up over eager", info["speedup"], BARS["logprobs_speedup"])])


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--memory":
    _inputs = make_inputs(int(sys.argv[4]), int(sys.argv[5]))
    print_peak(lambda: WORKLOADS[sys.argv[2]](sys.argv[3], *_inputs))
