"""``rf.ppo_loss`` forward and forward + backward: fused vs eager vs ``torch.compile`` of eager.

Run: ``pytest benchmarks/bench_ppo_loss.py`` (pytest-benchmark). Inputs, implementations,
the bytes model and the memory measurement are in ``ppo_loss_cases.py``; in short, the
fused kernels must move N·V·b bytes forward and 3·N·V·b forward + backward (b = bytes per
logit), and ``extra_info`` reports effective GB/s against that, the peak memory above the
inputs, and the speed-up over the eager reference measured in the same run. The end of the
run prints each implementation's speed-up as "N× faster than eager" (eager runs first in
each shape and mode; with ``--benchmark-disable`` too, the times are medians of rounds timed by hand).

CPU (default, small for CI): N = 512, V = 8192, fp32; "fused" is the C++ backend (skipped
when it is not built: the Triton interpreter is far too slow to time); no bar. CUDA: N = 16384,
V ∈ {151936, 32000, 128256}, bf16, plus the Triton kernels without autograd ("kernels")
and the device's copy bandwidth as the roofline; the fused forward + backward at V = 151936
must meet the bars of ``ppo_loss_cases.gpu_bars`` (≥ 85 % of the copy bandwidth, ≥ 4× eager,
≥ 1.5× torch.compile), asserted there. ``benchmarks/gpu_check.sh`` runs the CUDA table and the
same bars without pytest-benchmark.

Each implementation's time is the median of its rounds (5 on CUDA, 3 on CPU, after a warm-up),
timed by hand in every run, ``--benchmark-disable`` included.
"""

from __future__ import annotations

import statistics
from functools import cache

import pytest
import torch
from bars import assert_bars, interleaved, summary
from ppo_loss_cases import (
    CPU_SHAPES,
    GPU_BAR_SHAPE,
    GPU_SHAPES,
    IMPLS,
    MODES,
    availability,
    bytes_moved,
    copy_bandwidth,
    gpu_bars,
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
_medians = {}  # (shape, mode, impl) -> seconds, for the speed-ups of the implementations that follow


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
    benchmark.group = f"ppo_loss {DEVICE} {shape.label()} {mode}"
    step(inputs)  # warm-up (and compilation); the step synchronises the device itself
    inputs["logits"].grad = None
    times = interleaved(benchmark, {impl: lambda: step(inputs)}, impl, 5 if DEVICE == "cuda" else 3)[impl]
    inputs["logits"].grad = None
    info = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                bytes_model=bytes_moved(shape, mode),
                peak_mem_mib=_mib(peak_memory_above(step, inputs, DEVICE)))
    inputs["logits"].grad = None
    median, runs = statistics.median(times), len(times)
    _medians[(shape, mode, impl)] = median
    info["gb_per_s"] = bytes_moved(shape, mode) / median / 1e9
    eager = _medians.get((shape, mode, "eager"))
    if impl == "eager":
        info["vs_eager"] = f"the baseline ({median:.3g} s, median of {runs} runs)"
    elif eager is not None:
        info["speedup_vs_eager"] = eager / median
        info["vs_eager"] = line(impl, eager, median, runs)
    bars = []
    if DEVICE == "cuda" and shape == GPU_BAR_SHAPE and mode == "fwd+bwd" and impl == "fused":
        bars = gpu_bars({name: _medians.get((shape, mode, name)) for name in ("fused", "eager", "compiled")},
                        _copy_gb_per_s(), {name: "not measured in this run" for name in ("eager", "compiled")})
        info["vs_eager"] = info.get("vs_eager", "") + "; " + summary(bars)
    benchmark.extra_info.update(info)
    assert_bars(bars, f"rf.ppo_loss CUDA {shape.label()} fwd+bwd")


@cache
def _copy_gb_per_s() -> float:
    return statistics.median(copy_bandwidth("cuda", rounds=5) / 1e9 for _ in range(3))


@pytest.mark.skipif(DEVICE != "cuda", reason="the roofline is measured on a GPU")
def test_copy_bandwidth(benchmark):
    """The roofline for the GB/s above: read + write of a 4 GiB copy."""
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), copy_gb_per_s=_copy_gb_per_s())
    benchmark.pedantic(lambda: None, rounds=1)


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20
