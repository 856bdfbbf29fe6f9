"""Seeding and capturing the global RNGs (torch CPU and CUDA, python ``random``, numpy)."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python ``random`` and numpy."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> Dict[str, Any]:
    """The global RNG states: torch (CPU and every CUDA device), python ``random``, numpy.

    Only tensors and plain Python values (what ``torch.load(weights_only=True)`` reads back):
    numpy's state becomes a dict with its key as an int64 tensor.
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state((saved["bit_generator"], saved["key"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
