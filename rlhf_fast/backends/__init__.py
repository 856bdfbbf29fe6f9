"""Which backend runs a call: the registry of row backends.

A fused backend is a :class:`~rlhf_fast.backends.rows.RowOps` (see :mod:`.rows` for what
it receives and returns). The Triton (:mod:`.triton`) and C++ (:mod:`.cpp`) backends are
imported lazily, so that ``import rlhf_fast`` imports neither triton nor the C++ extension;
the closed-form reference registers itself as the ``"eager"`` row backend
(:mod:`rlhf_fast.loss.reference`). Backends never import each other, nor the loss layer.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, Optional, Tuple

import torch

from .rows import RowOps, RowParams, RowStats, TokenResults

__all__ = ["BACKENDS", "RowOps", "RowParams", "RowStats", "TokenResults", "load_ops", "register", "resolve"]

BACKENDS = ("auto", "triton", "cpp", "eager")

_MODULES = {"triton": "rlhf_fast.backends.triton", "cpp": "rlhf_fast.backends.cpp"}
_HOW_TO_GET = {
    "triton": "install triton (pip install triton) and pass CUDA tensors, "
    "or set TRITON_INTERPRET=1 before the first import of triton to run it on CPU tensors",
    "cpp": "build the C++ extension: pip install --no-build-isolation -e . with a C++ compiler and "
    "RLHF_FAST_BUILD_EXT unset (or =1); see the README's Install section",
}
_loaded: Dict[str, RowOps] = {}  # registered row backends (the reference, tests); imported ones live in their modules
_failures: Dict[str, str] = {}  # why a backend's import failed


def register(name: str, ops: RowOps) -> None:
    """Make ``ops`` the row backend ``name`` (the reference registers itself as ``"eager"``)."""
    _loaded[name] = ops


def _assume_constant_result(fn):
    # What torch.compiler.assume_constant_result does, without importing torch._dynamo
    # (and with it triton) at ``import rlhf_fast``; test_compile.py checks it still works.
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _import_ops(name: str) -> bool:
    """Import a backend once; remember why if it fails.

    Inside ``torch.compile`` this runs at trace time (an import cannot be traced) and
    its answer is a constant of the graph.
    """
    if name not in _failures:
        try:
            importlib.import_module(_MODULES[name])
        except Exception as exc:  # remember why; explicit requests report it
            _failures[name] = f"{type(exc).__name__}: {exc}"
    return name not in _failures


@_assume_constant_result
def _failure(name: str) -> str:
    return _failures[name]  # read live: a traced read of the dict could be a stale snapshot


def load_ops(name: str) -> Tuple[Optional[RowOps], str]:
    """The backend's :class:`RowOps`, or ``None`` and why it cannot be loaded."""
    if name in _loaded:
        return _loaded[name], ""
    if name not in _MODULES:
        return None, f"no row backend named {name!r}"
    if not _import_ops(name):
        return None, _failure(name)
    return sys.modules[_MODULES[name]].ROW_OPS, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, like: torch.Tensor) -> str:
    """The backend that will run on tensors like ``like``: ``"eager"``, ``"triton"`` or ``"cpp"``.

    ``like`` is the logits (or, for the fused-linear loss, the hidden states: same device
    and dtype as the logits they produce). ``"auto"``: Triton for CUDA tensors (and for CPU
    tensors when ``TRITON_INTERPRET=1``), the C++ extension for CPU tensors when it is built,
    the eager reference otherwise. An explicit backend that cannot run raises ``RuntimeError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fp64 = like.dtype == torch.float64
    if backend == "auto":
        if fp64:
            return "eager"  # fused kernels are fp32/bf16/fp16; fp64 is for gradcheck
        if like.is_cuda or triton_interpret():
            if load_ops("triton")[0] is not None:
                return "triton"
        if like.device.type == "cpu" and load_ops("cpp")[0] is not None:
            return "cpp"
        return "eager"
    if backend == "eager":
        return backend
    if fp64:
        raise ValueError(
            f"logits: backend {backend!r} takes fp32, bf16 or fp16 logits, got float64 "
            "(use backend='eager' or 'auto' for fp64)"
        )
    if backend == "triton" and not (like.is_cuda or triton_interpret()):
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors (got {like.device}); to run it on CPU set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )
    if backend == "cpp" and like.device.type != "cpu":
        raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got {like.device}")
    ops, why = load_ops(backend)
    if ops is None:
        raise RuntimeError(f"backend {backend!r} is not available ({why}); to get it: {_HOW_TO_GET[backend]}")
    return backend
