#!/usr/bin/env python
"""Static roofline of the Triton kernels on H100 / H200, without a GPU.

Every kernel the package launches is compiled ahead of time for sm_90 with the launch the
package itself would make: the launchers of ``rlhf_fast.kernels.ppo_loss`` are called on
meta tensors (shapes and strides, no data) with ``wrap_triton`` swapped for a recorder,
and each recorded launch is compiled with the specialisation a real launch gets (an int
equal to 1 becomes a constant, ints and pointers divisible by 16 carry that fact, meta
tensors count as 16-byte aligned allocations). The SASS comes from the ``cuobjdump`` that
ships inside the triton wheel.

    python benchmarks/static_roofline.py                      # V ∈ {32000, 50257, 128256, 151936}, bf16 and fp32
    python benchmarks/static_roofline.py --vocab 151936 --dtype bf16 --json out.json

Measured (exact compiler output for this triton / ptxas): registers, spills (``ptxas -v``
and local memory), shared memory, the SASS of the kernel: its streaming loop (the loop
that issues global loads), the width of every global load and store in it, and the
instruction mix per logit element, of the loop and of the whole program.

The script is in modules: ``roofline_record.py`` (the launches), ``roofline_compile.py`` (compiling one for
sm_90), ``roofline_sass.py`` (reading its SASS), ``roofline_model.py`` (the time model); this file runs one
op through them and is the command line.

Modelled (the assumptions are the constants of roofline_model.py and roofline_sass.py):

* Resources per SM of sm_90 (65536 registers, 64 warps, 32 CTAs, 228 KiB shared memory)
  give the CTAs resident per SM (k).
* Issue: 4 warp-instructions per clock per SM; pipes per clock per SM (warp-instructions):
  FP32 add/mul/fma 4, integer/compare/select/min/max/logic 2, IMAD 2, MUFU and conversions
  0.5, shuffles 1, load/store unit 1 (the per-SM throughput table of the CUDA C++
  Programming Guide for compute capability 9.0). The issue time of a CTA is its
  instructions on the busiest of these.
* Memory: HBM at 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200), 132 SMs, at 1.755 GHz (the
  sustained clock under a memory-bound load; 1.98 GHz boost in the table too).
* Latency (Little's law): a CTA alone moves one loop iteration's loads per iteration
  period: the load latency L = 1000 cycles, then the iteration's compute (its longest
  dependency chain or its issue time, whichever is longer), or the larger of L and the
  compute when the loop prefetches the next iteration's loads. The code outside the loop
  adds L, the transfer of its own loads at the SM's share of the bandwidth, and its issue
  time (or its dependency chain if longer). The resident CTAs overlap perfectly (an
  optimistic assumption at one or two CTAs per SM).
* Time of a launch: its CTAs run in waves of k per SM; a wave with j CTAs per SM lasts
  j × max(issue per CTA, bytes per CTA / (bandwidth per SM), latency chain per CTA / j),
  the last wave with the CTAs that are left; plus 2 µs per launch (launch and drain).
* Instructions outside the streaming loop count once per CTA, including both sides of
  branches (conservative); code after the last EXIT (slow paths such as a division's
  fix-up) and loops without global loads (the zero-writing path of masked rows) are cold.

Roofline fraction = (the op's own bytes / bandwidth) / modelled time, with the bytes of
the op: forward and logprobs read N·V·b; backward and the gradient-in-forward kernel
read N·V·b and write N·V·b; N = 16384 rows (B = 16 sequences of T = 1024 tokens, the
``logits[:, :-1]`` view of a ``[16, 1025, V]`` buffer).

How this model differs from a per-iteration in-order issue simulation (another way to
read the same SASS): it models throughput per SM wave by wave with Little's law instead
of simulating one warp's instruction stream, so the tail of a launch (a last, partly
filled wave) and small row counts are priced explicitly; it charges every instruction
outside the loop, both sides of every branch, to every CTA, rather than counting only a
simulated path; it adds a per-launch overhead, so an extra launch (the split-row combine
step) is never free; and it reads latency from the longest dependency chain of a loop
iteration, not from an issue simulation. Both are models: a GPU run (gpu_check.sh) is
the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the roofline_* modules beside this file
os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from roofline_compile import Compiled, compile_launch  # noqa: E402
from roofline_model import CLOCKS, MACHINES, analyse_launch, launch_time  # noqa: E402
from roofline_record import DTYPES, OPS, ROWS, load_kernels, op_bytes, op_launches  # noqa: E402
from roofline_sass import GLOBAL_LOAD, hot_code, innermost_loops, parse_sass  # noqa: E402

VOCABS = (32000, 50257, 128256, 151936)

# ----------------------------------------------------------------------------------
# One op at one (V, dtype)
# ----------------------------------------------------------------------------------


def analyse_op(module, op: str, vocab: int, dtype: torch.dtype, rows: int = ROWS, keep: Optional[str] = None):
    launches = op_launches(module, op, vocab, dtype, rows)
    if not launches:
        return None
    elem = torch.empty((), dtype=dtype).element_size()
    stream = op_bytes(op, vocab, dtype, rows)
    kernels = [(launch, compile_launch(launch, keep=keep)) for launch in launches]
    # The logits stream belongs to the launch with a streaming loop or, without one, to the
    # launch with the most programs; every launch moves per-row vectors (64 bytes a row).
    reports = []
    streaming = max(range(len(kernels)), key=lambda i: (_has_loop(kernels[i][1]), kernels[i][0].ctas))
    for i, (launch, compiled) in enumerate(kernels):
        mine = i == streaming
        reports.append(analyse_launch(launch, compiled, elem, rows * vocab if mine else 0, stream if mine else 0.0,
                                      64.0 * rows))
    result = dict(kernel=op, arch="sm_90", dtype=_short(dtype), V=vocab, N=rows,
                  launches=[r.name for r in reports], regs=max(r.regs for r in reports),
                  spills=sum(r.spills for r in reports),
                  insn_per_elem=sum(r.thread_insns for r in reports) / (rows * vocab),
                  loop_insn_per_elem=reports[streaming].loop_insn_per_elem,
                  load_widths=reports[streaming].load_widths, store_widths=reports[streaming].store_widths,
                  ctas_per_sm=reports[streaming].ctas_per_sm, warps=reports[streaming].warps,
                  prefetch=reports[streaming].prefetch, details=[asdict(r) for r in reports])  # fmt: skip
    for machine, bandwidth in MACHINES.items():
        for clock in CLOCKS:
            times = [launch_time(r, bandwidth, clock) for r in reports]
            seconds = sum(t["seconds"] for t in times)
            key = f"{machine.lower()}_{clock / 1e9:.3f}ghz"
            result[f"time_{key}"] = seconds
            result[f"roofline_{key}"] = stream / bandwidth / seconds
            result[f"bound_{key}"] = times[streaming]["bound"]
    result["roofline_h100"] = result["roofline_h100_1.755ghz"]
    result["roofline_h200"] = result["roofline_h200_1.755ghz"]
    return result


def _has_loop(compiled: Compiled) -> bool:
    insns = hot_code(parse_sass(compiled.sass))
    return any(any(i.base in GLOBAL_LOAD for i in insns[a: b + 1]) for a, b in innermost_loops(insns))


def _short(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# ----------------------------------------------------------------------------------
# Report and command line
# ----------------------------------------------------------------------------------


def _widths(widths: Dict[int, int]) -> str:
    return "+".join(f"{n}×{w}B" for w, n in sorted(widths.items(), reverse=True)) or "-"


def table(results: List[dict]) -> str:
    lines = [
        "| op | V | dtype | launches | warps | regs | spills | CTAs/SM | loads | stores | insn/elem "
        "(loop) | H100 @1.755 | H200 @1.755 | H200 @1.98 | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['kernel']} | {r['V']} | {r['dtype']} | {'+'.join(r['launches'])} | {r['warps']} | {r['regs']} | "
            f"{r['spills']} | {r['ctas_per_sm']} | {_widths(r['load_widths'])} | {_widths(r['store_widths'])} | "
            f"{r['insn_per_elem']:.2f} ({r['loop_insn_per_elem']:.2f}) | {r['roofline_h100']:.0%} | "
            f"{r['roofline_h200']:.0%} | {r['roofline_h200_1.980ghz']:.0%} | {r['bound_h200_1.755ghz']} |"
        )  # fmt: skip
    return "\n".join(lines)


def step_table(results: List[dict]) -> str:
    """Forward + backward of a training step vs the gradient-in-forward kernel, H200 @ 1.755 GHz."""
    by = {(r["kernel"], r["V"], r["dtype"]): r for r in results}
    lines = ["| V | dtype | forward + backward (ms) | % of 3·N·V·b roofline | gradient-in-forward (ms) | ratio |",
             "|---|---|---|---|---|---|"]
    for (op, vocab, dt), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if op != "forward" or ("backward", vocab, dt) not in by:
            continue
        two = r["time_h200_1.755ghz"] + by[("backward", vocab, dt)]["time_h200_1.755ghz"]
        floor = 3 * op_bytes("forward", vocab, DTYPES[dt]) / MACHINES["H200"]
        fused = by.get(("grad_in_forward", vocab, dt))
        cells = f"{fused['time_h200_1.755ghz'] * 1e3:.3f} | {fused['time_h200_1.755ghz'] / two:.2f}" if fused else \
            "n/a (forward + backward run) | -"
        lines.append(f"| {vocab} | {dt} | {two * 1e3:.3f} | {floor / two:.0%} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    parser.add_argument("--dtype", nargs="*", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    parser.add_argument("--rows", type=int, default=ROWS, help="N, rows of logits (default 16384)")
    parser.add_argument("--json", help="write the results as a JSON list here")
    parser.add_argument("--markdown", help="write the tables (the standard output) here too")
    parser.add_argument("--keep", help="keep the SASS, PTX and TTGIR of every kernel in this folder")
    parser.add_argument("--kernels", default="rlhf_fast.kernels.ppo_loss",
                        help="module with the launchers, each taking (call, outputs) of its op as "
                             "rlhf_fast/backends/ops.py declares it (a dotted name or a .py file)")
    args = parser.parse_args(argv)
    module = load_kernels(args.kernels)
    results = []
    for dt in args.dtype:
        for vocab in args.vocab:
            for op in args.ops:
                keep = os.path.join(args.keep, f"{op}.V{vocab}.{dt}") if args.keep else None
                r = analyse_op(module, op, vocab, DTYPES[dt], args.rows, keep)
                if r is not None:
                    results.append(r)
                    print(f"{op:>16} V={vocab:<6} {dt}: regs {r['regs']}, spills {r['spills']}, "
                          f"loads {_widths(r['load_widths'])}, {r['insn_per_elem']:.2f} insn/elem, "
                          f"H200 {r['roofline_h200']:.0%}", file=sys.stderr, flush=True)  # fmt: skip
    report = "\n".join([
        f"Modelled (static SASS model, no GPU), N = {args.rows}, sm_90, triton {triton.__version__}", "",
        table(results), "",
        "loads / stores: global accesses per thread per iteration of the streaming loop (of the whole program when"
        " there is none); insn/elem: SASS thread-instructions per logit, whole op (its loop alone); H100 / H200:"
        " modelled fraction of the bandwidth roofline at that clock.", "",
        step_table(results),
    ])  # fmt: skip
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
