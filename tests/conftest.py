"""Backends under test, found at collection time.

* ``eager``: the reference itself (autograd), the truth the others are checked against;
* ``rowref``: the shared autograd Function driven by the closed-form reference row ops,
  which checks the fused plumbing (aggregation weights, backward coefficients, metrics);
* ``cpp``: when the C++ extension is built;
* ``triton``: on CUDA, or on CPU through ``TRITON_INTERPRET=1`` (small shapes only).

The Triton kernels are imported once here in interpreter mode when there is no GPU, and
the variable is restored, so ``backend="auto"`` in other tests never picks the slow
interpreter; Triton tests set it again (``triton_env``) for their calls.

A backend that cannot load skips its tests, unless it is required: ``RLHF_FAST_REQUIRE_BACKENDS``
(a comma-separated list of ``cpp``, ``triton``; the Makefile's test targets set ``cpp,triton``)
turns a missing one into an error before any test runs, naming the backend and why it failed
to load, so that a broken build cannot pass as a shorter green run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from rlhf_fast import backends
from rlhf_fast.loss.reference import REFERENCE_OPS  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _load_triton() -> bool:
    if HAS_CUDA:
        return backends.load_ops("triton")[0] is not None
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return backends.load_ops("triton")[0] is not None
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


HAS_TRITON = _load_triton()
HAS_CPP = backends.load_ops("cpp")[0] is not None
TRITON_INTERPRETED = HAS_TRITON and not HAS_CUDA

FAST_BACKENDS = ["rowref"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON and HAS_CUDA else [])
"""Backends cheap enough for the full option grid."""
ALL_BACKENDS = FAST_BACKENDS + (["triton"] if TRITON_INTERPRETED else [])


REQUIRE_VARIABLE = "RLHF_FAST_REQUIRE_BACKENDS"
_LOADED = {"cpp": HAS_CPP, "triton": HAS_TRITON}


def missing_required_backends(required: str) -> list:
    """``"name: why"`` for each backend of the comma-separated ``required`` that did not load (or is unknown)."""
    problems = []
    for name in (n.strip() for n in required.split(",") if n.strip()):
        if name not in _LOADED:
            problems.append(f"{name}: not a backend that can be required (cpp, triton)")
        elif not _LOADED[name]:
            problems.append(f"{name}: {backends.load_ops(name)[1]}")
    return problems


def pytest_configure(config):
    problems = missing_required_backends(os.environ.get(REQUIRE_VARIABLE, ""))
    if problems:
        raise pytest.UsageError(f"{REQUIRE_VARIABLE}={os.environ[REQUIRE_VARIABLE]} requires backends that did not "
                                "load, whose tests would be skipped:\n  " + "\n  ".join(problems))


def pytest_report_header(config):
    why_cpp = "" if HAS_CPP else f" ({backends.load_ops('cpp')[1]})"
    why_triton = "" if HAS_TRITON else f" ({backends.load_ops('triton')[1]})"
    return [
        f"rlhf_fast backends: cpp={HAS_CPP}{why_cpp}; triton={HAS_TRITON}{why_triton}"
        f"{' (interpreter)' if TRITON_INTERPRETED else ''}; cuda={HAS_CUDA}",
    ]


@pytest.fixture
def triton_env(monkeypatch):
    """Lets ``backend="triton"`` run CPU tensors through the interpreter in this test."""
    if TRITON_INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def use_backend(monkeypatch, triton_env):
    """Call ``use_backend(name)`` to get the name to pass as ``backend=`` (registers rowref)."""

    def setup(name: str) -> str:
        if name == "rowref":
            monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS + ("rowref",))
            monkeypatch.setitem(backends._loaded, "rowref", REFERENCE_OPS)
        return name

    return setup


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs through the Triton interpreter here (slow: small grids only)."""
    return backend == "triton" and TRITON_INTERPRETED


def grid_params(backends, grid: list, interpreted_grid: list) -> list:
    """``pytest.param(backend, point, i, id="backend-i")`` for each point i of ``grid`` on each of ``backends``;
    a backend run by the Triton interpreter gets ``interpreted_grid`` instead."""
    return [pytest.param(backend, point, i, id=f"{backend}-{i}") for backend in backends
            for i, point in enumerate(interpreted_grid if interpreted(backend) else grid)]
