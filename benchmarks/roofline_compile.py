"""Ahead-of-time compilation of a recorded launch for sm_90, with the specialisation a real launch gets, and
what ptxas and cuobjdump (both inside the triton wheel) say about it: registers, spills, shared memory, SASS."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from roofline_record import Launch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP, PTXAS = os.path.join(_BIN, "cuobjdump"), os.path.join(_BIN, "ptxas")

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
