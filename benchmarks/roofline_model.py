"""The time model of the static roofline: occupancy on sm_90, the analysis of one compiled launch from its
SASS, and the modelled time of a launch (the assumptions are the constants here and in roofline_sass.py;
benchmarks/static_roofline.py states them)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List

from roofline_sass import (
    GLOBAL_LOAD,
    GLOBAL_STORE,
    LOAD_LATENCY,
    Insn,
    critical_path,
    hot_code,
    innermost_loops,
    parse_sass,
    pipe_counts,
    prefetches,
)

if TYPE_CHECKING:  # annotations only: the model needs neither torch nor triton
    from roofline_compile import Compiled
    from roofline_record import Launch

MACHINES = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes per second (H100 SXM5, H200)
SMS = 132
CLOCKS = (1.755e9, 1.98e9)
SM90 = dict(registers=65536, warps=64, ctas=32, shared=233472, shared_per_cta=1024)
LAUNCH_OVERHEAD = 2e-6  # seconds per launch: launch and drain between dependent kernels
PIPE_RATE = {"issue": 4.0, "fp32": 4.0, "alu": 2.0, "imad": 2.0, "xu": 0.5, "shfl": 1.0, "lsu": 1.0}


@dataclass
class KernelReport:
    name: str
    ctas: int
    warps: int
    regs: int
    spills: int
    shared: int
    ctas_per_sm: int
    limiter: str
    loop_insns: int  # SASS instructions per warp per loop iteration
    loop_elems: int  # logit elements per loop iteration (0: no streaming loop)
    trips: float  # loop iterations per CTA
    load_widths: Dict[int, int] = field(default_factory=dict)  # bytes per thread -> count (streaming loop)
    store_widths: Dict[int, int] = field(default_factory=dict)
    thread_insns: float = 0.0  # thread-instructions of the launch, all programs
    insn_per_elem: float = 0.0  # thread-instructions per logit element, whole program
    loop_insn_per_elem: float = 0.0
    mufu_per_elem: float = 0.0
    shfl_per_iter: int = 0
    bar_per_iter: int = 0
    prefetch: bool = False
    bytes_per_cta: float = 0.0
    loop_counts: Dict[str, int] = field(default_factory=dict)
    outside_counts: Dict[str, int] = field(default_factory=dict)
    iteration_period: float = 0.0  # cycles, CTA alone
    fixed_latency: float = 0.0  # cycles, code outside the loop, CTA alone, without its loads' transfer
    outside_load_bytes: float = 0.0  # global loads outside the loop, bytes per CTA


def occupancy(regs: int, shared: int, warps: int):
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {
        "registers": (SM90["registers"] // per_warp) // warps,
        "warps": SM90["warps"] // warps,
        "ctas": SM90["ctas"],
        "shared": SM90["shared"] // (shared + SM90["shared_per_cta"]),
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def analyse_launch(launch: Launch, compiled: Compiled, elem_bytes: int, elements: int, stream_bytes: float,
                   row_bytes: float) -> KernelReport:  # fmt: skip
    """``elements``: logits the launch reads (N·V or 0); ``stream_bytes``: logit bytes it reads and
    writes in all; ``row_bytes``: the rest (per-row vectors)."""
    insns = hot_code(parse_sass(compiled.sass))
    loops = [lp for lp in innermost_loops(insns) if any(ins.base in GLOBAL_LOAD for ins in insns[lp[0]: lp[1] + 1])]
    if len(loops) > 1:
        raise RuntimeError(f"{launch.name}: {len(loops)} streaming loops; the model expects one")
    cold = set()
    for a, b in innermost_loops(insns):
        if (a, b) not in loops:
            cold.update(range(a, b + 1))
    warps = compiled.warps
    threads = 32 * warps
    ctas_per_sm, limiter = occupancy(compiled.regs, compiled.shared, warps)
    loop_body: List[Insn] = []
    if loops:
        a, b = loops[0]
        loop_body = insns[a: b + 1]
        cold.update(range(a, b + 1))
    outside = [ins for i, ins in enumerate(insns) if i not in cold]
    accesses = loop_body or outside  # without a streaming loop: every access of the program
    loads = [ins for ins in accesses if ins.base in GLOBAL_LOAD]
    stores = [ins for ins in accesses if ins.base in GLOBAL_STORE]
    loop_elems = sum(ins.width for ins in loads) * threads // elem_bytes if loop_body else 0
    ctas = launch.ctas
    elems_per_cta = elements / ctas
    trips = math.floor(elems_per_cta / loop_elems) if loop_elems else 0
    loop_counts, outside_counts = pipe_counts(loop_body), pipe_counts(outside)
    total_warp_insns = trips * loop_counts["issue"] + outside_counts["issue"]
    per_elem = lambda n: n * threads / max(elems_per_cta, 1) if elems_per_cta else float("nan")  # noqa: E731
    prefetch = prefetches(loop_body) if loop_body else False
    if loop_body:
        # After its loads arrive an iteration runs its dependency chain, at least its issue time.
        compute = max(critical_path(loop_body, loads_cost=False), loop_counts["issue"] * math.ceil(warps / 4))
        period = max(LOAD_LATENCY, compute) if prefetch else LOAD_LATENCY + compute
    else:
        period = 0.0
    fixed = max(critical_path(outside), outside_counts["issue"] * math.ceil(warps / 4) + LOAD_LATENCY)
    outside_load_bytes = sum(ins.width for ins in outside if ins.base in GLOBAL_LOAD) * threads
    return KernelReport(
        name=launch.name, ctas=ctas, warps=warps, regs=compiled.regs,
        spills=compiled.spill_bytes + compiled.local_bytes, shared=compiled.shared,
        ctas_per_sm=ctas_per_sm, limiter=limiter, loop_insns=loop_counts["issue"], loop_elems=loop_elems,
        trips=trips, load_widths=dict(Counter(ins.width for ins in loads)),
        store_widths=dict(Counter(ins.width for ins in stores)),
        thread_insns=total_warp_insns * threads * ctas, insn_per_elem=per_elem(total_warp_insns),
        loop_insn_per_elem=loop_counts["issue"] * threads / loop_elems if loop_elems else 0.0,
        mufu_per_elem=per_elem(trips * loop_counts["xu"] + outside_counts["xu"]),
        shfl_per_iter=sum(ins.base == "SHFL" for ins in loop_body),
        bar_per_iter=sum(ins.base == "BAR" for ins in loop_body), prefetch=prefetch,
        bytes_per_cta=(stream_bytes + row_bytes) / ctas, loop_counts=dict(loop_counts),
        outside_counts=dict(outside_counts), iteration_period=period, fixed_latency=fixed,
        outside_load_bytes=outside_load_bytes,
    )  # fmt: skip


def launch_time(r: KernelReport, bandwidth: float, clock: float) -> dict:
    """Modelled seconds of one launch (module docstring), and what bounds it."""
    issue = max(
        (r.trips * r.loop_counts.get(p, 0) + r.outside_counts.get(p, 0)) * r.warps / rate
        for p, rate in PIPE_RATE.items()
    )
    per_sm = bandwidth / SMS / clock  # bytes per cycle
    memory = r.bytes_per_cta / per_sm
    # A CTA alone: its loop iterations, then the code outside the loop after its loads arrive.
    latency = r.trips * r.iteration_period + r.fixed_latency + r.outside_load_bytes / per_sm
    k = max(r.ctas_per_sm, 1)
    per_wave = k * SMS
    full_waves, left = divmod(r.ctas, per_wave)
    cycles, bound = 0.0, Counter()

    def wave(j):
        parts = {"issue": j * issue, "memory": j * memory, "latency": latency}
        name = max(parts, key=parts.get)
        return parts[name], name

    if full_waves:
        t, name = wave(k)
        cycles += full_waves * t
        bound[name] += full_waves * t
    if left:
        t, name = wave(math.ceil(left / SMS))
        cycles += t
        bound[name] += t
    return dict(seconds=cycles / clock + LAUNCH_OVERHEAD, bound=max(bound, key=bound.get) if bound else "none",
                issue_cycles_per_cta=issue, memory_cycles_per_cta=memory, latency_cycles_per_cta=latency)
