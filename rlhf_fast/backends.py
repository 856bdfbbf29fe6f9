"""Which backend runs a call, and the row-kernel interface every fused backend provides.

A fused backend is a :class:`RowOps`: three functions over logits viewed as
``[B, T, V]`` (any strides on B and T, stride 1 on V) and per-row vectors ``[N = B·T]``:

* ``forward(logits, targets, advantages, old_logprobs, ref_logprobs, cfg) -> TokenResults``
* ``backward(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature, out)``
  writes d(loss)/d(logits) into ``out`` (``[B, T, V]``, which may be ``logits`` itself);
* ``logprobs(logits, targets, temperature, with_entropy) -> (lp, entropy or None)``.

Targets arrive sanitised (every id in [0, V)), as contiguous int32 or int64; the other
vectors as contiguous fp32. ``backward`` also accepts a target of −1: the row's target
lies on another vocabulary shard (``process_group``), so there is no one-hot term.

Backends never import each other; each is loaded lazily so that ``import rlhf_fast``
imports neither triton nor the C++ extension.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import reference
from .config import BACKENDS


class RowOps(NamedTuple):
    forward: Callable
    backward: Callable
    logprobs: Callable


def _reference_backward(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature, out):
    grad = reference.token_backward(logits, targets, lse, entropy, coef_logprob, coef_entropy, temperature)
    out.copy_(grad.view(out.shape))


REFERENCE_OPS = RowOps(reference.token_forward, _reference_backward, reference.token_logprobs)
"""The closed-form reference as a row backend (fused-linear's fallback, and tests)."""

_MODULES = {"triton": "rlhf_fast.triton_ops", "cpp": "rlhf_fast.cpp_ops"}
_HOW_TO_GET = {
    "triton": "install triton (pip install triton) and pass CUDA tensors, "
    "or set TRITON_INTERPRET=1 before the first import of triton to run it on CPU tensors",
    "cpp": "build the C++ extension: pip install -e . with a C++ compiler and "
    "RLHF_FAST_BUILD_EXT unset (or =1); see README 'Install'",
}
_loaded: Dict[str, RowOps] = {}  # ops registered by hand (tests); imported backends live in their modules
_failures: Dict[str, str] = {}  # why a backend's import failed


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
    if name in _loaded:  # tests may register a backend here
        return _loaded[name], ""
    if not _import_ops(name):
        return None, _failure(name)
    return getattr(sys.modules[__package__], _MODULES[name].rsplit(".", 1)[1]).ROW_OPS, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, logits: torch.Tensor) -> str:
    """The backend that will run: ``"eager"``, ``"triton"`` or ``"cpp"`` (SPEC §1)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fp64 = logits.dtype == torch.float64
    if backend == "auto":
        if fp64:
            return "eager"  # fused kernels are fp32/bf16/fp16; fp64 is for gradcheck
        if logits.is_cuda or triton_interpret():
            if load_ops("triton")[0] is not None:
                return "triton"
        if logits.device.type == "cpu" and load_ops("cpp")[0] is not None:
            return "cpp"
        return "eager"
    if backend == "eager":
        return backend
    if fp64:
        raise ValueError(f"logits: backend {backend!r} takes fp32, bf16 or fp16 logits, got float64")
    if backend == "triton" and not (logits.is_cuda or triton_interpret()):
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors (got {logits.device}); to run it on CPU set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )
    if backend == "cpp" and logits.device.type != "cpu":
        raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got {logits.device}")
    ops, why = load_ops(backend)
    if ops is None:
        raise RuntimeError(f"backend {backend!r} is not available ({why}); to get it: {_HOW_TO_GET[backend]}")
    return backend
