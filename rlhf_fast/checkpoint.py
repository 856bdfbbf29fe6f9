"""Atomic checkpoint files and RNG state capture, so a killed run resumes exactly; sharded
``torch.distributed.checkpoint`` directories for data-parallel runs."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any, Dict, Optional

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


# ----------------------------------------------------------------------------- torch.distributed

_LATEST = "latest"
"""Name of the file in a sharded checkpoint directory that names the current step directory."""


def save_sharded(directory: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 meta: Dict[str, Any], group=None) -> None:
    """Collective: model and optimizer with ``torch.distributed.checkpoint`` (DCP), plus ``meta``.

    Writes ``directory/step-NNNNNNNN/`` (the DCP files and rank 0's ``meta.pt``), then makes it
    current by rewriting ``directory/latest`` atomically and removes older step directories; a
    crash mid-save leaves the previous checkpoint current. State dicts are keyed by parameter
    name (``get_state_dict``), so DDP and FSDP2 runs of any world size can load them. The
    directory must be on a file system every rank sees.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    is_main = dist.get_rank(group) == 0
    name = f"step-{step:08d}"
    path = os.path.join(directory, name)
    if is_main:
        shutil.rmtree(path, ignore_errors=True)  # a partial save of this step by a crashed run
        os.makedirs(path)
    dist.barrier(group=group)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path, process_group=group)
    if is_main:
        atomic_save(meta, os.path.join(path, "meta.pt"))
        atomic_write_text(name, os.path.join(directory, _LATEST))
        for entry in os.listdir(directory):
            if entry.startswith("step-") and entry != name:
                shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    dist.barrier(group=group)


def latest_sharded(directory: str) -> Optional[str]:
    """The current step directory of a :func:`save_sharded` checkpoint, or ``None``."""
    try:
        with open(os.path.join(directory, _LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    return os.path.join(directory, name)


def load_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group=None) -> None:
    """Collective: load a :func:`save_sharded` step directory into ``model`` and ``optimizer`` in place.

    Any world size and either wrapper (DDP or FSDP2); DCP reshards as needed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to load into
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
