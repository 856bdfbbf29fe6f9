"""Atomic checkpoint files and RNG state capture, so a killed run resumes exactly."""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict

import torch

try:  # numpy is a dependency of the package, but keep the RNG capture optional
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``.

    A crash mid-write leaves the previous file intact; readers never see a partial one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (temporary file + ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (on CPU; it holds RNG states and dicts)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> Dict[str, Any]:
    """The global RNG states: torch (CPU and every CUDA device), python ``random``, numpy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and np is not None:
        np.random.set_state(state["numpy"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python ``random`` and numpy."""
    random.seed(seed)
    torch.manual_seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
