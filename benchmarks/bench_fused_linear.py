"""Fused-linear PPO loss vs the eager path, forward + backward.

Run: ``pytest benchmarks/bench_fused_linear.py`` (pytest-benchmark; the end of the run says
how many times faster than eager the fused path was, and its memory against eager's; ``-s``
also prints every number of ``extra_info``). The eager path is the
baseline of ``rlhf_fast.loss.reference``: ``logits = hidden @ weight.T`` to full ``[N, V]`` logits,
then ``rf.ppo_loss(..., backend="eager")``, autograd back to hidden and weight. Both paths
run the same loss options (k3 KL, β = 0.05, entropy bonus η = 0.01, old/ref log-probs,
token-mean), on the same inputs, in the same run.

CPU (always): fp32, H = 256, V = 32000. The fused-linear bar (peak memory above the inputs
≤ 0.35× eager, time ≤ 1.2× eager, for the row backend "auto" gives) is asserted in every run
(``bars.py``). The bar shape N = 8192 takes minutes on a small machine (each eager step holds
several fp32 [N, V] tensors, ~1 GiB each), so it runs only with ``RLHF_FAST_BENCH_FULL=1``; by
default (CI) N = 1024 (same H, V, so the same chunk size), 3 rounds, under a minute.

With ``RLHF_FAST_BENCH_FULL=1`` a second variant runs the fused-linear loss with the
closed-form reference as row backend (``backend="eager"``): what a machine without the
C++ extension gets; it is reported, not asserted.

Time: interleaved rounds of the eager and fused paths (``bars.interleaved``; with timing on,
pytest-benchmark times the fused path and the eager path runs in its untimed ``setup``), so
the two share the machine's noise. ``extra_info`` holds both medians and their ratio.

Peak memory above the inputs: each path runs once in a fresh subprocess. After the inputs
are built the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``) and
the baseline RSS read; after one forward + backward, peak RSS (VmHWM) minus the baseline
is reported. Both include the parameter gradients (.grad of hidden and weight). glibc
is told to serve every allocation above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), so
freed tensors leave the RSS and are not silently reused from the heap.

GPU (CUDA only): N = 16384, H = 4096, V = 151936, bf16; fused-linear vs eager vs
``torch.compile`` of the eager path; time by CUDA events, peak memory above the inputs
by ``torch.cuda.max_memory_allocated``. FLOPs model: the three matmuls (logits, d hidden,
d weight) are 2·N·H·V each, 6·N·H·V in all (the softmax work is O(N·V), ~H times less);
TFLOP/s = 6·N·H·V / time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import pytest
import torch
from bars import assert_bars, at_most, interleaved, summary
from machine import cpu_name, peak_in_fresh_process, print_peak
from versus_eager import line, times_faster

import rlhf_fast as rf

FULL = os.environ.get("RLHF_FAST_BENCH_FULL", "0") == "1"
CPU_SHAPE = dict(n=8192 if FULL else 1024, h=256, v=32000)
CPU_ROUNDS = 3
GPU_SHAPE = dict(n=16384, h=4096, v=151936)
LOSS_OPTIONS = dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
MEMORY_BAR = 0.35
TIME_BAR = 1.2


def make_inputs(n: int, h: int, v: int, dtype=torch.float32, device="cpu"):
    """hidden [n, h], weight [v, h] (leaves with grad), targets, advantages, old/ref [n]."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype=dtype, device=device).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype=dtype, device=device).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    advantages = torch.randn(n, generator=gen).to(device)
    old = (-torch.rand(n, generator=gen) * 10.0 - 5.0).to(device)
    ref = (old + 0.1 * torch.randn(n, generator=gen).to(device)).to(device)
    return hidden, weight, targets, advantages, old, ref


def eager_step(hidden, weight, targets, advantages, old, ref):
    logits = hidden @ weight.T
    out = rf.ppo_loss(logits, targets, advantages, old, ref, backend="eager", **LOSS_OPTIONS)
    out.loss.backward()


def fused_step(hidden, weight, targets, advantages, old, ref, row_backend="auto"):
    out = rf.fused_linear_ppo_loss(hidden, weight, targets, advantages, old, ref, backend=row_backend,
                                   **LOSS_OPTIONS)
    out.loss.backward()


def fused_eager_rows_step(*inputs):
    fused_step(*inputs, row_backend="eager")


STEPS = {"eager": eager_step, "fused": fused_step, "fused-eager-rows": fused_eager_rows_step}
FUSED_VARIANTS = ["fused"] + (["fused-eager-rows"] if FULL else [])
"""``fused`` = row backend "auto" (C++ when built); ``fused-eager-rows`` = the closed-form
reference as row backend, i.e. what a machine without the C++ extension gets."""


def _clear_grads(inputs):
    for t in inputs[:2]:
        t.grad = None


# ----------------------------------------------------------------------------------
# CPU: peak RSS above the inputs, one path per fresh subprocess.
# ----------------------------------------------------------------------------------


def measure_peak_memory(path: str, n: int, h: int, v: int):
    """Bytes above the inputs at the peak of one forward + backward, or None without /proc."""
    return peak_in_fresh_process(__file__, ["--memory", path, n, h, v])


def _row_backend() -> str:
    from rlhf_fast import backends

    return backends.resolve("auto", torch.empty(1))


@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_cpu_fused_linear_vs_eager(benchmark, variant):
    n, h, v = CPU_SHAPE["n"], CPU_SHAPE["h"], CPU_SHAPE["v"]
    memory = {path: measure_peak_memory(path, n, h, v) for path in ("eager", variant)}

    inputs = make_inputs(n, h, v)

    def run(path):
        _clear_grads(inputs)
        STEPS[path](*inputs)
        _clear_grads(inputs)

    run(variant)  # warm-up
    benchmark.group = f"fused-linear CPU N={n} H={h} V={v} fp32 fwd+bwd"
    times = interleaved(benchmark, {path: (lambda p=path: run(p)) for path in ("eager", variant)}, variant,
                        CPU_ROUNDS)
    fused_times, eager_times = times[variant], times["eager"]
    fused_median = statistics.median(fused_times)
    eager_median = statistics.median(eager_times)
    info = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "row_backend": _row_backend() if variant == "fused" else "eager",
        "shape": f"N={n} H={h} V={v} fp32",
        "eager_median_s": eager_median,
        "fused_median_s": fused_median,
        "time_ratio": fused_median / eager_median,
        "eager_peak_above_inputs_MiB": memory["eager"] / 2**20,
        "fused_peak_above_inputs_MiB": memory[variant] / 2**20,
        "memory_ratio": memory[variant] / memory["eager"],
        "vs_eager": line(f"{variant} (rows: {_row_backend() if variant == 'fused' else 'eager'})", eager_median,
                         fused_median, len(fused_times), memory["eager"], memory[variant]),
    }
    if variant == "fused":  # the bar is for what "auto" gives
        bars = [at_most("fwd+bwd time over eager's", info["time_ratio"], TIME_BAR),
                at_most("peak memory over eager's", info["memory_ratio"], MEMORY_BAR)]
        info["vs_eager"] += "; " + summary(bars)
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
    if variant == "fused":
        assert_bars(bars, f"fused-linear, {info['shape']}")


# ----------------------------------------------------------------------------------
# GPU: fused-linear vs eager vs torch.compile(eager), bf16 (skipped without CUDA).
# ----------------------------------------------------------------------------------


def _cuda_measure(step, inputs, rounds: int = 5):
    """(median seconds, peak bytes above the inputs) of ``step`` on CUDA."""
    step(*inputs)  # warm-up (and compilation)
    _clear_grads(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(*inputs)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
        _clear_grads(inputs)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_linear_vs_eager_and_compile(benchmark):
    n, h, v = GPU_SHAPE["n"], GPU_SHAPE["h"], GPU_SHAPE["v"]
    inputs = make_inputs(n, h, v, dtype=torch.bfloat16, device="cuda")
    flops = 6 * n * h * v
    results = {}
    steps = {"fused": fused_step, "eager": eager_step, "compile": torch.compile(eager_step)}
    for name, step in steps.items():
        try:
            seconds, peak = _cuda_measure(step, inputs)
        except torch.OutOfMemoryError:
            results[name] = "out of memory"
            torch.cuda.empty_cache()
            continue
        results[name] = {"median_s": seconds, "peak_above_inputs_GiB": peak / 2**30,
                         "tflops": flops / seconds / 1e12}
    benchmark.group = f"fused-linear CUDA N={n} H={h} V={v} bf16 fwd+bwd"
    benchmark.pedantic(fused_step, args=inputs, setup=lambda: _clear_grads(inputs), rounds=3, iterations=1)
    results["device"] = torch.cuda.get_device_name()
    for other in ("eager", "compile"):
        if isinstance(results[other], dict):
            results[f"speedup_vs_{other}"] = results[other]["median_s"] / results["fused"]["median_s"]
            results[f"memory_ratio_vs_{other}"] = (
                results["fused"]["peak_above_inputs_GiB"] / results[other]["peak_above_inputs_GiB"]
            )
    if isinstance(results["eager"], dict):
        results["vs_eager"] = (f"fused {times_faster(results['eager']['median_s'], results['fused']['median_s'])}; "
                               f"peak memory above the inputs {results['memory_ratio_vs_eager']:.2g}× eager's")
    elif isinstance(results["fused"], dict):
        results["vs_eager"] = f"eager ran out of memory; fused {results['fused']['median_s']:.3g} s"
    benchmark.extra_info.update(results)
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--memory":
    _inputs = make_inputs(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    print_peak(lambda: STEPS[sys.argv[2]](*_inputs))
