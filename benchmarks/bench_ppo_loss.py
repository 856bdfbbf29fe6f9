"""``rf.ppo_loss`` forward and forward + backward: fused vs eager vs ``torch.compile`` of eager.

Run: ``pytest benchmarks/bench_ppo_loss.py`` (pytest-benchmark). Inputs, implementations,
the bytes model and the memory measurement are in ``ppo_loss_cases.py``; in short, the
fused kernels must move N·V·b bytes forward and 3·N·V·b forward + backward (b = bytes per
logit), and ``extra_info`` reports effective GB/s against that, the peak memory above the
inputs, and the speed-up over the eager reference measured in the same run. The end of the
run prints each implementation's speed-up as "N× faster than eager" (eager runs first in
each shape and mode; with ``--benchmark-disable`` the times are one hand-timed run each, after a warm-up).

CPU (default, small for CI): N = 512, V = 8192, fp32; "fused" is the C++ backend (skipped
when it is not built: the Triton interpreter is far too slow to time). CUDA: N = 16384,
V ∈ {151936, 32000, 128256}, bf16, plus the Triton kernels without autograd ("kernels")
and the device's copy bandwidth as the roofline. ``benchmarks/gpu_check.sh`` runs the CUDA
table without pytest-benchmark.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from ppo_loss_cases import (
    CPU_SHAPES,
    GPU_SHAPES,
    IMPLS,
    MODES,
    availability,
    bytes_moved,
    copy_bandwidth,
    make_inputs,
    make_step,
    peak_memory_above,
)
from versus_eager import line

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = GPU_SHAPES if DEVICE == "cuda" else CPU_SHAPES
# Eager first in each (shape, mode) group, so the others can report their speed-up over it.
CASES = [(shape, mode, impl) for shape in SHAPES for mode in MODES for impl in IMPLS]

_inputs = {}  # one shape's inputs at a time: every implementation sees the same tensors
_eager_median = {}


def _shared_inputs(shape):
    if shape not in _inputs:
        _inputs.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        _inputs[shape] = make_inputs(shape, DEVICE)
    return _inputs[shape]


@pytest.mark.parametrize(
    "shape,mode,impl", CASES, ids=[f"{s.vocab}-{s.dtype}-{m}-{i}" for s, m, i in CASES]
)
def test_ppo_loss(benchmark, shape, mode, impl):
    why = availability(impl, DEVICE)
    if why is not None:
        pytest.skip(why)
    inputs = _shared_inputs(shape)
    step = make_step(impl, mode, DEVICE)
    times = []

    def timed(args):  # the step synchronises the device itself
        start = time.perf_counter()
        step(args)
        times.append(time.perf_counter() - start)

    benchmark.group = f"ppo_loss {DEVICE} {shape.label()} {mode}"
    if getattr(benchmark, "disabled", False):  # one timed run only: warm up (and compile) first
        step(inputs)
        inputs["logits"].grad = None
    benchmark.pedantic(timed, args=(inputs,), rounds=5 if DEVICE == "cuda" else 3, warmup_rounds=1, iterations=1)
    inputs["logits"].grad = None
    info = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                bytes_model=bytes_moved(shape, mode),
                peak_mem_mib=_mib(peak_memory_above(step, inputs, DEVICE)))
    inputs["logits"].grad = None
    stats = getattr(benchmark.stats, "stats", None)  # None with --benchmark-disable: one hand-timed run
    median, runs = (stats.median, len(stats.data)) if stats is not None else (times[-1], 1)
    info["gb_per_s"] = bytes_moved(shape, mode) / median / 1e9
    key = (shape, mode)
    if impl == "eager":
        _eager_median[key] = median
        info["vs_eager"] = f"the baseline ({median:.3g} s, {'one run' if runs == 1 else f'median of {runs} runs'})"
    elif key in _eager_median:
        info["speedup_vs_eager"] = _eager_median[key] / median
        info["vs_eager"] = line(impl, _eager_median[key], median, runs)
    benchmark.extra_info.update(info)


@pytest.mark.skipif(DEVICE != "cuda", reason="the roofline is measured on a GPU")
def test_copy_bandwidth(benchmark):
    """The roofline for the GB/s above: read + write of a 4 GiB copy."""
    values = [copy_bandwidth("cuda", rounds=5) / 1e9 for _ in range(3)]
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), copy_gb_per_s=statistics.median(values))
    benchmark.pedantic(lambda: None, rounds=1)


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20
