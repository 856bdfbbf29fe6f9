"""The SASS reader of the static roofline (``benchmarks/roofline_sass.py``) on small SASS texts, without Triton:
instructions, pipes, widths, registers, loops, hot code, dependency chains and prefetching, each checked
against values worked out by hand from the listing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import roofline_sass as sass  # noqa: E402

# A streaming loop (0x40 to 0x90) whose 16-byte load feeds the FFMA of the same iteration, the store and
# EXIT after it, then a slow path (a loop of its own, after EXIT: cold). In the layout cuobjdump prints.
LISTING = """
        Function : _demo_kernel
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                          /* 0x0000000000007919 */
        /*0020*/                   IMAD.WIDE R2, R0, 0x10, R12 ;
        /*0030*/                   MOV R8, RZ ;
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0050*/                   FFMA R8, R4, R5, R8 ;
        /*0060*/                   MUFU.EX2 R9, R8 ;
        /*0070*/                   IADD3 R2, P0, R2, 0x10, RZ ;
        /*0080*/                   ISETP.NE.AND P1, PT, R2, R10, PT ;
        /*0090*/               @P1 BRA 0x40 ;
        /*00a0*/                   STG.E desc[UR4][R2.64], R9 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   FCHK P0, R8, R9 ;
        /*00d0*/              @!P0 BRA 0xc0 ;
"""

# The same loop with the load moved after its use: the load fills registers for the next iteration only.
PREFETCHING = """
        /*0000*/                   FFMA R8, R4, R5, R8 ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0030*/                   BRA 0x0 ;
        /*0040*/                   EXIT ;
"""


def test_the_reader_imports_neither_torch_nor_triton():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import roofline_sass; "
            "bad = [m for m in ('torch', 'triton') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, BENCHMARKS], check=True, timeout=60)


def test_instructions_are_parsed():
    insns = sass.parse_sass(LISTING)
    assert [i.address for i in insns] == list(range(0, 0xE0, 0x10))  # headers and encodings are not instructions
    assert [i.opcode for i in insns[:5]] == ["LDC", "S2R", "IMAD.WIDE", "MOV", "LDG.E.128"]
    assert [o.strip() for o in insns[4].operands] == ["R4", "desc[UR4][R2.64]"]
    assert [o.strip() for o in insns[8].operands] == ["P1", "PT", "R2", "R10", "PT"]
    assert insns[9].predicate == "@P1" and insns[9].base == "BRA" and insns[9].target() == 0x40
    assert insns[13].predicate == "@!P0" and insns[13].target() == 0xC0
    assert insns[0].target() is None


def test_pipes_widths_and_latencies():
    by_opcode = {i.opcode: i for i in sass.parse_sass(LISTING)}
    pipes = {op: by_opcode[op].pipe for op in ("LDG.E.128", "FFMA", "MUFU.EX2", "IADD3", "IMAD.WIDE", "STG.E", "BRA")}
    assert pipes == {"LDG.E.128": "lsu", "FFMA": "fp32", "MUFU.EX2": "xu", "IADD3": "alu", "IMAD.WIDE": "imad",
                     "STG.E": "lsu", "BRA": None}
    assert by_opcode["LDG.E.128"].width == 16 and by_opcode["STG.E"].width == 4
    assert by_opcode["LDG.E.128"].latency() == sass.LOAD_LATENCY
    assert by_opcode["MUFU.EX2"].latency() == sass.LATENCY["xu"]
    assert by_opcode["LDC"].latency() == sass.LATENCY["const"] and by_opcode["S2R"].latency() == sass.LATENCY["special"]
    assert by_opcode["BRA"].latency() == sass.LATENCY["other"]


def test_registers_of_each_instruction():
    insns = sass.parse_sass(LISTING)
    load, _, _, add, compare, branch, store = insns[4:11]
    # a 128-bit load writes four registers; a .64 address reads a register pair
    assert load.registers() == (["R4", "R5", "R6", "R7"], ["UR4", "R2", "R3"])
    # a second predicate operand is a destination (the carry); RZ and PT are constants, not dependencies
    assert add.registers() == (["R2", "P0"], ["R2"])
    assert compare.registers() == (["P1"], ["R2", "R10"])
    # a branch writes nothing and reads its predicate; a store writes nothing
    assert branch.registers() == ([], ["P1"])
    assert store.registers() == ([], ["UR4", "R2", "R3", "R9"])


def test_loops_hot_code_and_pipe_counts():
    insns = sass.parse_sass(LISTING)
    assert sass.innermost_loops(insns) == [(4, 9), (12, 13)]
    hot = sass.hot_code(insns)
    assert hot[-1].base == "EXIT" and len(hot) == 12
    assert sass.innermost_loops(hot) == [(4, 9)]  # the slow path's loop is after EXIT: cold
    body = hot[4:10]
    assert sass.pipe_counts(body) == {"issue": 6, "lsu": 1, "fp32": 1, "xu": 1, "alu": 2}


def test_critical_path_of_the_loop():
    body = sass.parse_sass(LISTING)[4:10]
    # LDG (0 without load cost) -> FFMA +4 -> MUFU +18 = 22; the compare chain IADD3 +5 -> ISETP +5 -> BRA +4 = 14
    assert sass.critical_path(body, loads_cost=False) == 22
    assert sass.critical_path(body) == sass.LOAD_LATENCY + 22


def test_prefetching():
    assert not sass.prefetches(sass.parse_sass(LISTING)[4:10])  # the FFMA after the load reads it
    loop = sass.parse_sass(PREFETCHING)
    assert sass.innermost_loops(loop) == [(0, 3)]
    assert sass.prefetches(loop[0:4])
    assert not sass.prefetches(loop[2:4])  # no load at all


@pytest.mark.parametrize("line", ["", "        /* 0x000fe20000000800 */", "        Function : _demo_kernel"])
def test_lines_without_an_instruction_are_skipped(line):
    assert sass.parse_sass(line) == []
