"""Inputs, implementations and measurements of the ``rf.ppo_loss`` benchmark.

Shared by ``bench_ppo_loss.py`` (pytest-benchmark) and ``gpu_check.sh``, which runs this
file as a script so that a GPU machine without pytest-benchmark still gets the table:
``python benchmarks/ppo_loss_cases.py --out DIR``.

Implementations, on the same inputs in the same run:

* ``eager``: ``rf.ppo_loss(..., backend="eager")``, the reference (autograd);
* ``compiled``: ``torch.compile`` of that same eager call (Inductor);
* ``fused``: ``rf.ppo_loss(..., backend="auto")``: Triton on CUDA, C++ on CPU;
* ``kernels`` (CUDA only): the Triton row ops called directly (forward, then backward
  into a fresh buffer), without autograd and aggregation: the kernels' own speed.

Bytes model: the bytes the fused kernels must move, b = bytes per logit, per-row vectors
(O(N), under 0.1 %) left out:

* forward: read the logits once, N·V·b;
* forward + backward: forward N·V·b, backward reads the logits again and writes
  d(logits) once, 2·N·V·b; in all 3·N·V·b.

Effective GB/s = that byte count / time, for every implementation (so GB/s ratios are
speed ratios). The roofline is the device's copy bandwidth measured in the same run
(``dst.copy_(src)`` of a 4 GiB buffer, read + write).

The CUDA bars (:func:`gpu_bars`), on the fused forward + backward at N = 16384, V = 151936,
bf16: ≥ 85 % of that roofline, ≥ 4× faster than eager and ≥ 1.5× faster than torch.compile of
eager, all measured in the same run. ``bench_ppo_loss.py`` asserts them; run as a script
(``gpu_check.sh``) this file writes them to ``ppo_loss_bars.json``, prints each failing one and
exits 1 when one fails or could not be measured.

Peak memory: above what the inputs and leftovers hold when the step starts (CUDA:
``max_memory_allocated``; CPU: peak RSS via ``/proc/self/clear_refs``, when available).
A forward + backward step includes the logits' ``.grad`` (N·V·b) in every column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from bars import Bar, at_least
from machine import peak_rss_above, release_freed_memory

import rlhf_fast as rf
from rlhf_fast import backends

OPTIONS = dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, clip_eps=0.2, validate=False)
"""A PPO step with a KL penalty and an entropy bonus; validation off (it is O(N), not the loss)."""

IMPLS = ("eager", "compiled", "fused", "kernels")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    vocab: int
    dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        return f"N={self.rows} V={self.vocab} {self.dtype}"


CPU_SHAPES = (Shape(4, 128, 8192, "float32"),)
GPU_SHAPES = tuple(Shape(16, 1024, v, "bfloat16") for v in (151936, 32000, 128256))


GPU_BAR_SHAPE = GPU_SHAPES[0]
GPU_BARS = {"roofline": 0.85, "eager": 4.0, "compiled": 1.5}


def gpu_bars(medians: Dict[str, Optional[float]], copy_gb_per_s: Optional[float],
             why_missing: Optional[Dict[str, str]] = None) -> List[Bar]:
    """The CUDA bars from the fwd+bwd medians (seconds) of ``"fused"``, ``"eager"`` and ``"compiled"`` at
    :data:`GPU_BAR_SHAPE` and the copy bandwidth measured in the same run.

    Each bar is a time ratio over the fused median: the roofline's (the bytes model at the copy
    bandwidth), eager's, compiled's. A missing number (None: skipped, out of memory, cut by a time
    limit) gives a NaN value, a failed bar, whose name says why (``why_missing``, by implementation).
    """
    why_missing = why_missing or {}

    def bar(name: str, numerator_s: Optional[float], impls: List[str], bound: float) -> Bar:
        missing = [f"{impl}: {why_missing.get(impl, 'not measured')}" for impl in impls if medians.get(impl) is None]
        if numerator_s is None and not missing:
            missing = ["the copy bandwidth: not measured"]
        if missing:
            return at_least(f"{name} (not measured: {'; '.join(missing)})", float("nan"), bound)
        return at_least(name, numerator_s / medians["fused"], bound)

    roofline_s = bytes_moved(GPU_BAR_SHAPE, "fwd+bwd") / (copy_gb_per_s * 1e9) if copy_gb_per_s else None
    return [bar("fused fwd+bwd fraction of the measured copy bandwidth", roofline_s, ["fused"], GPU_BARS["roofline"]),
            bar("fused fwd+bwd speed-up over eager", medians.get("eager"), ["fused", "eager"], GPU_BARS["eager"]),
            bar("fused fwd+bwd speed-up over torch.compile", medians.get("compiled"), ["fused", "compiled"],
                GPU_BARS["compiled"])]


def gpu_bars_of(results: List[dict], copy_gb_per_s: Optional[float]) -> List[Bar]:
    """:func:`gpu_bars` from the rows :func:`measure` returned (the fwd+bwd rows at the bar shape)."""
    rows = {r["impl"]: r for r in results if r["mode"] == "fwd+bwd" and (r["batch"], r["seq"], r["vocab"], r["dtype"])
            == (GPU_BAR_SHAPE.batch, GPU_BAR_SHAPE.seq, GPU_BAR_SHAPE.vocab, GPU_BAR_SHAPE.dtype)}
    medians = {impl: rows.get(impl, {}).get("median_s") for impl in ("fused", "eager", "compiled")}
    why = {impl: rows[impl].get("skipped", "not measured") if impl in rows else "not run" for impl in medians}
    return gpu_bars(medians, copy_gb_per_s, why)


def bytes_moved(shape: Shape, mode: str) -> int:
    """The fused kernels' bytes (module docstring): N·V·b forward, 3·N·V·b with backward."""
    logits_bytes = shape.rows * shape.vocab * torch.empty((), dtype=shape.torch_dtype).element_size()
    return logits_bytes * (1 if mode == "fwd" else 3)


def make_inputs(shape: Shape, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Logits ``[B, T, V]`` (a leaf with grad) and per-token tensors ``[B, T]``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, t, v = shape.batch, shape.seq, shape.vocab
    logits = torch.randn(b, t, v, device=device, generator=gen, dtype=torch.float32).mul_(2.0)
    logits = logits.to(shape.torch_dtype).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), device=device, generator=gen)
    with torch.no_grad():
        lp = rf.logprobs(logits.detach(), targets, backend="eager")
    noise = lambda: 0.3 * torch.randn(b, t, device=device, generator=gen)  # noqa: E731
    return dict(logits=logits, targets=targets, advantages=torch.randn(b, t, device=device, generator=gen),
                old_logprobs=lp + noise(), ref_logprobs=lp + noise())


def _loss_call(backend: str) -> Callable:
    def call(logits, targets, advantages, old_logprobs, ref_logprobs):
        return rf.ppo_loss(logits, targets, advantages, old_logprobs, ref_logprobs, backend=backend,
                           **OPTIONS).loss

    return call


_COMPILED: Dict[str, Callable] = {}


def availability(impl: str, device: str) -> Optional[str]:
    """None when ``impl`` can run on ``device``, else why not."""
    if impl in ("eager", "compiled"):
        return None
    if device == "cuda":
        ops, why = backends.load_ops("triton")
        return None if ops is not None else f"triton backend: {why}"
    if impl == "kernels":
        return "the kernels-only column is CUDA only"
    ops, why = backends.load_ops("cpp")
    return None if ops is not None else f"C++ backend not built ({why}); the Triton interpreter is too slow"


def make_step(impl: str, mode: str, device: str) -> Callable[[Dict[str, torch.Tensor]], None]:
    """One benchmark step on the inputs: forward (the loss, graph kept) or forward + backward."""
    if impl == "kernels":
        return _kernels_step(mode)
    if impl == "compiled":
        loss = _COMPILED.setdefault(device, torch.compile(_loss_call("eager")))
    else:
        loss = _loss_call("eager" if impl == "eager" else "auto")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(inputs):
        inputs["logits"].grad = None
        value = loss(**inputs)
        if mode == "fwd+bwd":
            value.backward()
        sync()

    return step


def _kernels_step(mode: str):
    import rlhf_fast as rf
    from rlhf_fast.loss.functional import rows_view

    ops = backends.load_ops("triton")[0]
    cfg = rf.LossOptions(clip_eps=OPTIONS["clip_eps"], kl_coef=OPTIONS["kl_coef"], kl_estimator=OPTIONS["kl_estimator"],
                         entropy_coef=OPTIONS["entropy_coef"]).row_params(has_old=True, has_ref=True)

    def step(inputs):
        logits = rows_view(inputs["logits"].detach())
        targets = inputs["targets"].reshape(-1)
        vectors = [inputs[k].reshape(-1).float() for k in ("advantages", "old_logprobs", "ref_logprobs")]
        res = ops.forward(logits, targets, *vectors, cfg)
        if mode == "fwd+bwd":
            out = torch.empty_like(logits)
            coef_entropy = torch.full_like(res.log_sum, cfg.entropy_coef / targets.numel())
            ops.backward(logits, targets, res.row_max, res.log_sum, res.entropy, res.dlogp / targets.numel(),
                         coef_entropy,
                         cfg.temperature, out)
        torch.cuda.synchronize()

    return step


def time_step(step, inputs, device: str, rounds: int, warmup: int = 1) -> List[float]:
    """Seconds per step: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        step(inputs)
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(inputs)
            times.append(time.perf_counter() - t0)
    return times


def peak_memory_above(step, inputs, device: str) -> Optional[int]:
    """Peak bytes one step allocates above what is held when it starts."""
    inputs["logits"].grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(inputs)
        return torch.cuda.max_memory_allocated() - base
    try:
        release_freed_memory()
    except OSError:
        return None
    return peak_rss_above(lambda: step(inputs))


def copy_bandwidth(device: str, gib: float = 4.0, rounds: int = 10) -> float:
    """Measured device bandwidth, bytes/s: read + write of a ``gib`` GiB copy."""
    numel = int(gib * 2**30) // 2
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def step(buffers):
        buffers["dst"].copy_(buffers["src"])
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = statistics.median(time_step(step, dict(src=src, dst=dst), device, rounds, warmup=2))
    return 2 * numel * 2 / seconds


def measure(impl: str, mode: str, shape: Shape, inputs, device: str, rounds: int) -> dict:
    """One row of the table: median time, effective GB/s, peak memory (or why it was skipped)."""
    row = dict(impl=impl, mode=mode, **asdict(shape), rows=shape.rows, device=device)
    why = availability(impl, device)
    if why is not None:
        return dict(row, skipped=why)
    try:
        step = make_step(impl, mode, device)
        times = time_step(step, inputs, device, rounds)
        peak = peak_memory_above(step, inputs, device)
    except torch.cuda.OutOfMemoryError as exc:
        return dict(row, skipped=f"out of memory: {str(exc).splitlines()[0]}")
    finally:
        inputs["logits"].grad = None
    median = statistics.median(times)
    return dict(row, median_s=median, min_s=min(times), rounds=len(times),
                gb_per_s=bytes_moved(shape, mode) / median / 1e9, peak_mem_bytes=peak)


SWEEP_FORWARD = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))
SWEEP_BACKWARD = ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16))


def sweep_launch_configs(shape: Shape, rounds: int = 10) -> List[dict]:
    """GB/s of the forward and backward kernels alone for a few (BLOCK_V, num_warps).

    Data for tuning ``launch_config`` on a new GPU: the kernels are launched directly,
    without autograd, each configuration after one warm-up (which compiles it).
    """
    from rlhf_fast.backends import ops
    from rlhf_fast.kernels import ppo_loss as kernels
    from rlhf_fast.loss.functional import rows_view

    inputs = make_inputs(shape, "cuda")
    logits = rows_view(inputs["logits"].detach())
    targets = inputs["targets"].reshape(-1)
    adv, old, ref = (inputs[k].reshape(-1).float() for k in ("advantages", "old_logprobs", "ref_logprobs"))
    outputs = [torch.empty_like(adv) for _ in range(11)]  # TokenResults order: lp, H, m, log s, ...
    grad = torch.empty_like(logits)
    forward_call = ops.PPO_FORWARD.bind(logits, targets, adv, old, ref, ratio_low=0.8, ratio_high=1.2, dual_clip=0.0,
                                        kl_coef=0.05, kl_estimator=2, entropy_coef=0.01, temperature=1.0)
    backward_call = ops.PPO_BACKWARD.bind(logits, targets, row_max=outputs[2], log_sum=outputs[3], entropy=outputs[1],
                                          coef_logprob=adv, coef_entropy=adv, temperature=1.0, out=grad)
    current = kernels.launch_config(shape.vocab, shape.torch_dtype)
    rows = []
    for kind, choices in (("forward", SWEEP_FORWARD), ("backward", SWEEP_BACKWARD)):
        for block, warps in choices:
            config = kernels.LaunchConfig(block, warps, block, warps)
            if kind == "forward":
                launch = lambda _, c=config: kernels.ppo_forward(forward_call, outputs, config=c)  # noqa: E731
                moved = bytes_moved(shape, "fwd")
                is_default = (block, warps) == (current.block_v, current.num_warps)
            else:
                launch = lambda _, c=config: kernels.ppo_backward(backward_call, config=c)  # noqa: E731
                moved = 2 * bytes_moved(shape, "fwd")
                is_default = (block, warps) == (current.bwd_block_v, current.bwd_num_warps)
            seconds = statistics.median(time_step(launch, None, "cuda", rounds, warmup=1))
            rows.append(dict(kernel=kind, block_v=block, num_warps=warps, default=is_default,
                             median_s=seconds, gb_per_s=moved / seconds / 1e9, **asdict(shape)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown_table(results: List[dict], copy_gb_per_s: Optional[float], device_name: str) -> str:
    bandwidth = f"measured copy bandwidth {copy_gb_per_s:.0f} GB/s" if copy_gb_per_s else "no copy bandwidth"
    lines = [f"Device: {device_name}; torch {torch.__version__}; {bandwidth}",
             "",
             "| shape | mode | impl | median ms | eff. GB/s | % of copy BW | vs eager | vs compiled | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in results:
        if "median_s" in r:
            base[(r["vocab"], r["rows"], r["dtype"], r["mode"], r["impl"])] = r["median_s"]
    for r in results:
        label = f"N={r['rows']} V={r['vocab']} {r['dtype']}"
        if "median_s" not in r:
            lines.append(f"| {label} | {r['mode']} | {r['impl']} | skipped: {r.get('skipped', '?')} |  |  |  |  |  |")
            continue
        key = (r["vocab"], r["rows"], r["dtype"], r["mode"])
        eager, compiled = (base.get(key + (other,)) for other in ("eager", "compiled"))
        ratio = lambda other, median=r["median_s"]: f"{other / median:.2f}×" if other else "–"  # noqa: E731
        pct = f"{100 * r['gb_per_s'] / copy_gb_per_s:.0f} %" if copy_gb_per_s else "–"
        peak = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") is not None else "–"
        lines.append(f"| {label} | {r['mode']} | {r['impl']} | {1e3 * r['median_s']:.2f} | {r['gb_per_s']:.1f} | "
                     f"{pct} | {ratio(eager)} | {ratio(compiled)} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=".", help="folder for ppo_loss_raw.jsonl and ppo_loss_table.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab", type=int, nargs="*", help="only these vocabulary sizes")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS))
    parser.add_argument("--sweep", action="store_true", help="only sweep the kernels' launch configs (CUDA)")
    args = parser.parse_args(argv)
    device = args.device
    if args.sweep:
        return _sweep_main(args)
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if args.vocab:
        shapes = tuple(s for s in shapes if s.vocab in args.vocab)
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, "ppo_loss_raw.jsonl")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    copy_bw = copy_bandwidth(device) / 1e9 if device == "cuda" else None
    results = []
    with open(raw_path, "w") as raw:
        raw.write(json.dumps(dict(device_name=device_name, copy_gb_per_s=copy_bw, torch=torch.__version__)) + "\n")
        for shape in shapes:
            inputs = make_inputs(shape, device)
            for mode in MODES:
                for impl in args.impls:
                    t0 = time.perf_counter()
                    row = measure(impl, mode, shape, inputs, device, args.rounds)
                    row["wall_s"] = time.perf_counter() - t0  # includes compilation
                    results.append(row)
                    raw.write(json.dumps(row) + "\n")
                    raw.flush()  # a run cut short by a time limit keeps what it measured
                    print(json.dumps(row), flush=True)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    table = markdown_table(results, copy_bw, device_name)
    failing = []
    if device == "cuda" and GPU_BAR_SHAPE in shapes:
        bars = gpu_bars_of(results, copy_bw)
        failing = [b for b in bars if not b.ok]
        with open(os.path.join(args.out, "ppo_loss_bars.json"), "w") as f:
            json.dump([dict(b._asdict(), ok=b.ok, text=b.describe()) for b in bars], f, indent=1)
        table += f"\nBars ({GPU_BAR_SHAPE.label()}, fwd+bwd): " + "; ".join(b.describe() for b in bars) + "\n"
    with open(os.path.join(args.out, "ppo_loss_table.md"), "w") as f:
        f.write(table)
    print(table)
    measured = sum("median_s" in r for r in results)
    print(f"{measured} measured, {len(results) - measured} skipped; table in {args.out}/ppo_loss_table.md")
    for bar in failing:
        print(f"BAR FAILED: {bar.describe()}")
    return 1 if failing else 0


def _sweep_main(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    shape = next(s for s in GPU_SHAPES if not args.vocab or s.vocab in args.vocab)
    rows = sweep_launch_configs(shape)
    lines = [f"Launch-config sweep, {shape.label()}, {torch.cuda.get_device_name()} (* = launch_config's choice)",
             "", "| kernel | BLOCK_V | num_warps | median ms | GB/s |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " *" if r["default"] else ""
        lines.append(f"| {r['kernel']} | {r['block_v']}{mark} | {r['num_warps']} | {1e3 * r['median_s']:.3f} | "
                     f"{r['gb_per_s']:.0f} |")
    with open(os.path.join(args.out, "launch_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "launch_sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
