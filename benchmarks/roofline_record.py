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
OPS = ("forward", "logprobs", "backward", "grad_in_forward")  # as DECLARED below


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


DECLARED = {"forward": "PPO_FORWARD", "logprobs": "LOGPROBS", "backward": "PPO_BACKWARD",
            "grad_in_forward": "PPO_FORWARD_GRAD"}
"""The op declaration (rlhf_fast/backends/ops.py) behind each recorded op."""
SETTINGS = dict(ratio_low=0.8, ratio_high=1.28, dual_clip=3.0, kl_coef=0.04, kl_estimator=2, entropy_coef=0.01,
                with_entropy=True)
"""The recorded launches' settings: every feature on (old and reference log-probs given too, the dual clip,
k3, the entropy), so that what is compiled is the largest variant of each kernel."""


def op_launches(module, op: str, vocab: int, dtype: torch.dtype, rows: int = ROWS,
                temperature: float = 1.0) -> List[Launch]:  # fmt: skip
    """The launches one op makes for ``rows`` rows of ``logits[:, :-1]`` of a ``[B, T+1, V]`` buffer: the op's
    arguments built from its declaration (logits-shaped tensors as such views, every per-row tensor given except
    the ones that default to None, ``SETTINGS``), its outputs from its fake, then its launcher called."""
    if op not in DECLARED:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    from rlhf_fast.backends import ops

    declared = getattr(ops, DECLARED[op])
    seq = SEQ if rows % SEQ == 0 else rows
    batch = rows // seq
    tensors = dict(
        logits=lambda: torch.empty(batch, seq + 1, vocab, dtype=dtype, device="meta")[:, :-1],
        ids=lambda: torch.empty(rows, dtype=torch.int64, device="meta"),
        rows=lambda: torch.empty(rows, dtype=torch.float32, device="meta"),
    )
    values = dict(SETTINGS, temperature=temperature)
    values.update({arg.name: tensors[arg.shape]() for arg in declared.args if arg.shape and arg.default is not None})
    call = declared.bind(**{arg.name: values[arg.name] for arg in declared.args if arg.name in values})
    if op == "grad_in_forward" and not module.forward_grad_applies(call.logits, call.out):
        return []  # forward + backward run instead
    with recording(module) as launches:
        getattr(module, declared.launcher)(call, declared.fake(*declared.positional(**vars(call))) or ())
    return launches


def op_bytes(op: str, vocab: int, dtype: torch.dtype, rows: int = ROWS) -> float:
    """The bytes an op must move (its roofline): N·V·b read, plus N·V·b written by the gradient ops."""
    once = rows * vocab * torch.empty((), dtype=dtype).element_size()
    return once * (2 if op in ("backward", "grad_in_forward") else 1)
