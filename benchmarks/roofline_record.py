"""The launches of the static roofline: the package's launchers called on meta tensors (shapes and strides,
no data) with ``wrap_triton`` swapped for a recorder, so that what is compiled is what the package launches."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

import torch  # noqa: E402

ROWS, BATCH, SEQ = 16384, 16, 1024
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
OPS = ("forward", "logprobs", "backward", "grad_in_forward")


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
    """The launchers' module: a dotted name, or the path of a launchers file (``kernels/ppo_loss.py`` of another
    checkout), whose folder is then loaded as a package so that the modules it imports come from there too."""
    if spec.endswith(".py"):
        folder, name = os.path.split(os.path.abspath(spec))
        package = importlib.util.module_from_spec(importlib.util.spec_from_loader(_PATH_PACKAGE, None,
                                                                                  is_package=True))
        package.__path__ = [folder]
        for loaded in [m for m in sys.modules if m == _PATH_PACKAGE or m.startswith(_PATH_PACKAGE + ".")]:
            del sys.modules[loaded]  # another folder's modules, from an earlier call
        sys.modules[_PATH_PACKAGE] = package
        return importlib.import_module(f"{_PATH_PACKAGE}.{name[:-3]}")
    return importlib.import_module(spec)


_PATH_PACKAGE = "static_roofline_kernels"


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
