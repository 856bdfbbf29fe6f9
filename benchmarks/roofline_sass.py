"""Reading SASS (the ``cuobjdump -sass`` text of one kernel) for the static roofline: instructions, their
pipes, widths, registers and latencies, the innermost loops, the hot code and the dependency chains.

Plain Python (no torch, no triton), so that it can be tested on a small SASS text. The latencies are
assumptions of the model (benchmarks/static_roofline.py says which).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional

LOAD_LATENCY = 1000  # cycles: loaded HBM latency
LATENCY = {"fp32": 4, "alu": 5, "imad": 5, "xu": 18, "shfl": 28, "lsu_shared": 30, "const": 10, "special": 20,
           "barrier": 24, "other": 4}  # fmt: skip

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
