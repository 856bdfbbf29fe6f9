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

Modelled (the assumptions are the constants below):

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
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# ----------------------------------------------------------------------------------
# Machines and model constants
# ----------------------------------------------------------------------------------

MACHINES = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes per second (H100 SXM5, H200)
SMS = 132
CLOCKS = (1.755e9, 1.98e9)
SM90 = dict(registers=65536, warps=64, ctas=32, shared=233472, shared_per_cta=1024)
LOAD_LATENCY = 1000  # cycles: loaded HBM latency
LAUNCH_OVERHEAD = 2e-6  # seconds per launch: launch and drain between dependent kernels
PIPE_RATE = {"issue": 4.0, "fp32": 4.0, "alu": 2.0, "imad": 2.0, "xu": 0.5, "shfl": 1.0, "lsu": 1.0}
LATENCY = {"fp32": 4, "alu": 5, "imad": 5, "xu": 18, "shfl": 28, "lsu_shared": 30, "const": 10, "special": 20,
           "barrier": 24, "other": 4}  # fmt: skip

ROWS, BATCH, SEQ = 16384, 16, 1024
VOCABS = (32000, 50257, 128256, 151936)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
OPS = ("forward", "logprobs", "backward", "grad_in_forward")

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP, PTXAS = os.path.join(_BIN, "cuobjdump"), os.path.join(_BIN, "ptxas")

# ----------------------------------------------------------------------------------
# Launches: the package's launchers on meta tensors, wrap_triton recorded
# ----------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return launch


@contextmanager
def recording(module):
    launches: List[Launch] = []
    original = module.wrap_triton
    module.wrap_triton = lambda kernel: _Recorder(kernel, launches)
    try:
        yield launches
    finally:
        module.wrap_triton = original


def load_kernels(spec: str):
    """The kernels module: a dotted name or a path to a .py file."""
    if spec.endswith(".py"):
        loader = importlib.util.spec_from_file_location("static_roofline_kernels", spec)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def op_launches(module, op: str, vocab: int, dtype: torch.dtype, rows: int = ROWS,
                temperature: float = 1.0) -> List[Launch]:  # fmt: skip
    """The launches one op makes for ``rows`` rows of ``logits[:, :-1]`` of a ``[B, T+1, V]`` buffer."""
    seq = SEQ if rows % SEQ == 0 else rows
    batch = rows // seq
    meta = dict(device="meta")
    logits = torch.empty(batch, seq + 1, vocab, dtype=dtype, **meta)[:, :-1]
    vector = lambda: torch.empty(rows, dtype=torch.float32, **meta)  # noqa: E731
    targets = torch.empty(rows, dtype=torch.int64, **meta)
    with recording(module) as launches:
        if op == "forward":
            module.ppo_forward(logits, targets, vector(), vector(), vector(), tuple(vector() for _ in range(11)),
                               0.8, 1.28, 3.0, 0.04, 2, 0.01, temperature)  # fmt: skip
        elif op == "logprobs":
            module.logprobs(logits, targets, vector(), vector(), vector(), vector(), temperature)
        elif op == "backward":
            out = torch.empty(batch, seq + 1, vocab, dtype=dtype, **meta)[:, :-1]
            module.ppo_backward(logits, targets, vector(), vector(), vector(), vector(), vector(), temperature, out)
        elif op == "grad_in_forward":
            out = torch.empty(batch, seq + 1, vocab, dtype=dtype, **meta)[:, :-1]
            if not module.forward_grad_applies(logits, out):
                return []  # forward + backward run instead
            module.ppo_forward_grad(logits, targets, vector(), vector(), vector(), vector(),
                                    tuple(vector() for _ in range(11)), out, 0.8, 1.28, 3.0, 0.04, 2, 0.01,
                                    temperature)  # fmt: skip
        else:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return launches


def op_bytes(op: str, vocab: int, dtype: torch.dtype, rows: int = ROWS) -> float:
    """The bytes an op must move (its roofline): N·V·b read, plus N·V·b written by the gradient ops."""
    once = rows * vocab * torch.empty((), dtype=dtype).element_size()
    return once * (2 if op in ("backward", "grad_in_forward") else 1)


# ----------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90
# ----------------------------------------------------------------------------------

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32"}  # fmt: skip


def _specialise(launch: Launch):
    """(signature, constants, attributes) of the launch, by the JIT's rules."""
    fn = launch.kernel
    names = fn.arg_names
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    unspecialised = {p.name for p in fn.params if p.do_not_specialize}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexprs:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # meta tensors: fresh, aligned allocations
        elif value is None:
            signature[name] = "constexpr"
            constants[name] = None
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1 and name not in unspecialised:
                signature[name] = "constexpr"
                constants[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0 and name not in unspecialised:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: argument {name} of type {type(value).__name__}")
    return signature, constants, attrs


@dataclass
class Compiled:
    name: str
    warps: int
    regs: int
    spill_bytes: int
    local_bytes: int
    shared: int
    sass: str
    ptx: str


def compile_launch(launch: Launch, arch: int = 90, keep: Optional[str] = None) -> Compiled:
    signature, constants, attrs = _specialise(launch)
    warps = launch.kwargs.get("num_warps", 4)
    options = {"num_warps": warps}
    for option in ("num_stages", "maxnreg"):
        if option in launch.kwargs:
            options[option] = launch.kwargs[option]
    source = ASTSource(launch.kernel, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        sass = _run(CUOBJDUMP, "-sass", cubin)
        usage = _run(CUOBJDUMP, "-res-usage", cubin)
        target = re.search(r"\.target\s+(\S+)", compiled.asm["ptx"])[1]
        verbose = _run(PTXAS, "-v", f"--gpu-name={target}", ptx, "-o", os.path.join(tmp, "v.cubin"))
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    if keep:
        os.makedirs(keep, exist_ok=True)
        for suffix, text in (("sass", sass), ("ptx", compiled.asm["ptx"]), ("ttgir", compiled.asm["ttgir"])):
            with open(os.path.join(keep, f"{launch.name}.{suffix}"), "w") as f:
                f.write(text)
    return Compiled(
        name=launch.name, warps=warps, regs=int(resources[1]), local_bytes=int(resources[4]),
        spill_bytes=int(spills[1]) + int(spills[2]) if spills else 0, shared=int(resources[3]),
        sass=sass, ptx=compiled.asm["ptx"],
    )  # fmt: skip


def _run(*command) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    return done.stdout + done.stderr


# ----------------------------------------------------------------------------------
# SASS: instructions, loops, classes
# ----------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_REGISTER = re.compile(r"\b(U?R\d+|U?P\d+)(\.64)?\b")
_NO_DEST = {"STG", "STS", "ST", "STL", "RED", "BAR", "BRA", "EXIT", "BSYNC", "BSSY", "WARPSYNC", "NOP", "CALL",
            "RET", "MEMBAR", "ERRBAR", "DEPBAR", "CCTL", "YIELD", "FENCE", "SYNCS"}  # fmt: skip

FP32 = {"FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "HFMA2", "HADD2", "HMUL2"}
ALU = {"FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "IADD3", "LOP3", "SHF", "LEA", "ISETP", "SEL", "PRMT", "MOV",
       "IABS", "VIADD", "VIMNMX", "IMNMX", "PLOP3", "P2R", "R2P", "FLO", "POPC", "BREV", "LOP32I", "IADD32I",
       "MOV32I", "HSETP2", "HMNMX2", "BMSK", "SGXT", "VIADDMNMX", "IADD", "LOP", "SHL", "SHR", "CS2R"}  # fmt: skip
IMAD = {"IMAD", "IMUL", "IMAD32I"}
XU = {"MUFU", "I2F", "F2I", "F2F", "I2FP", "F2IP", "FRND", "F2FP"}
SHARED_MEM = {"LDS", "STS", "LDSM", "ATOMS"}
GLOBAL_LOAD = {"LDG", "LD"}
GLOBAL_STORE = {"STG", "ST", "RED", "ATOMG"}


@dataclass
class Insn:
    address: int
    predicate: str
    opcode: str
    operands: List[str]

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def pipe(self) -> Optional[str]:
        b = self.base
        if b in FP32:
            return "fp32"
        if b in ALU:
            return "alu"
        if b in IMAD:
            return "imad"
        if b in XU:
            return "xu"
        if b == "SHFL":
            return "shfl"
        if b in SHARED_MEM or b in GLOBAL_LOAD or b in GLOBAL_STORE:
            return "lsu"
        return None

    @property
    def width(self) -> int:
        """Bytes per thread of a global access (LDG.E.128: 16)."""
        parts = self.opcode.split(".")[1:]
        for mark, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if mark in parts:
                return size
        return 4

    def target(self) -> Optional[int]:
        if self.base != "BRA":
            return None
        found = re.search(r"0x([0-9a-f]+)\s*$", " ".join(self.operands))
        return int(found[1], 16) if found else None

    def registers(self):
        """(destinations, sources) as register names."""

        def regs(operand):
            names = []
            for m in _REGISTER.finditer(operand):
                names.append(m[1])
                if m[2] and m[1].lstrip("U").startswith("R"):
                    prefix = "UR" if m[1].startswith("UR") else "R"
                    names.append(f"{prefix}{int(m[1][len(prefix):]) + 1}")
            return names

        ops = self.operands
        sources = [r for o in ops for r in regs(o)] + (regs(self.predicate) if self.predicate else [])
        if self.base in _NO_DEST or not ops or ops[0].lstrip().startswith("["):
            return [], sources
        dest_ops = [ops[0]]
        if len(ops) > 1 and re.fullmatch(r"\s*!?U?P[T0-9]+\s*", ops[1]):
            dest_ops.append(ops[1])
        dests = [r for o in dest_ops for r in regs(o)]
        words = {"128": 4, "64": 2}.get(next((p for p in self.opcode.split(".") if p in ("128", "64")), ""), 1)
        if words > 1 and dests and dests[0].startswith("R"):
            dests += [f"R{int(dests[0][1:]) + k}" for k in range(1, words)]
        sources = [r for o in ops[len(dest_ops):] for r in regs(o)] + (regs(self.predicate) if self.predicate else [])
        if self.predicate:
            sources += dests  # a predicated write keeps the old value
        return dests, sources

    def latency(self) -> float:
        b = self.base
        if b in GLOBAL_LOAD:
            return LOAD_LATENCY
        if b in ("LDS", "LDSM"):
            return LATENCY["lsu_shared"]
        if b in ("LDC", "ULDC"):
            return LATENCY["const"]
        if b in ("S2R", "S2UR"):
            return LATENCY["special"]
        if b == "BAR":
            return LATENCY["barrier"]
        return LATENCY.get(self.pipe or "other", LATENCY["other"])


def parse_sass(text: str) -> List[Insn]:
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            operands = _split(m[4]) if m[4].strip() else []
            out.append(Insn(int(m[1], 16), (m[2] or "").strip(), m[3], operands))
    return out


def _split(text: str) -> List[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[(" or 0
        depth -= ch in "])" or 0
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current] if current.strip() else parts


def innermost_loops(insns: List[Insn]) -> List[tuple]:
    """(first, last) indices of loops: a branch back to an earlier address, innermost only."""
    index = {ins.address: i for i, ins in enumerate(insns)}
    loops = []
    for i, ins in enumerate(insns):
        target = ins.target()
        if target is not None and target <= ins.address and target in index:
            loops.append((index[target], i))
    return [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def hot_code(insns: List[Insn]) -> List[Insn]:
    """Instructions up to the last EXIT (after it: slow paths reached by rare branches)."""
    last = max((i for i, ins in enumerate(insns) if ins.base == "EXIT"), default=len(insns) - 1)
    return insns[: last + 1]


def pipe_counts(body: List[Insn]) -> Counter:
    c = Counter(issue=len(body))
    for ins in body:
        if ins.pipe:
            c[ins.pipe] += 1
    return c


def critical_path(body: List[Insn], loads_cost: bool = True) -> float:
    """Longest register dependency chain through ``body`` (cycles), loads at LOAD_LATENCY."""
    ready: Dict[str, float] = {}
    longest = 0.0
    for ins in body:
        dests, sources = ins.registers()
        start = max([ready.get(r, 0.0) for r in sources], default=0.0)
        lat = ins.latency() if (loads_cost or ins.base not in GLOBAL_LOAD) else 0.0
        for r in dests:
            if r not in ("RZ", "PT", "URZ", "UPT"):
                ready[r] = start + lat
        longest = max(longest, start + lat)
    return longest


def prefetches(body: List[Insn]) -> bool:
    """Whether the loop's loads feed only the next iteration (nothing after a load reads it)."""
    loads = [i for i, ins in enumerate(body) if ins.base in GLOBAL_LOAD]
    for i in loads:
        dests = set(body[i].registers()[0])
        if any(dests & set(ins.registers()[1]) for ins in body[i + 1:]):
            return False
    return bool(loads)


# ----------------------------------------------------------------------------------
# Analysis of one launch and the time model
# ----------------------------------------------------------------------------------


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
# Report
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
                        help="module with the launchers (a dotted name or a .py file)")
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
