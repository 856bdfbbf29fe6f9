"""Checkpoints that survive a crash: atomic files, and one interface for two kinds of checkpoint.

* :func:`atomic_save` / :func:`atomic_write_text`: write to a temporary file in the same
  directory, fsync, then ``os.replace``: a crash mid-write leaves the previous file intact.
* :class:`SingleFileCheckpoint` (one process: ``out_dir/checkpoint.pt``) and
  :class:`ShardedCheckpoint` (torch.distributed: ``out_dir/checkpoint/``, DCP directories that
  resume under any world size) share ``exists()``, ``save(step, meta)``, ``read()`` and
  ``restore(state)``;
  :func:`open_checkpoint` picks one and refuses to resume the other kind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .seeding import rng_state, set_rng_state


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def load(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (on CPU; it holds RNG states and dicts)."""
    return torch.load(path, map_location="cpu", weights_only=False)


class SingleFileCheckpoint:
    """One process: models, optimizer, RNG states and ``meta`` in ``out_dir/checkpoint.pt``."""

    def __init__(self, out_dir: str, policy: nn.Module, critic: Optional[nn.Module], optimizer):
        self.path = os.path.join(out_dir, "checkpoint.pt")
        self.policy, self.critic, self.optimizer = policy, critic, optimizer

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self, step: int, meta: Dict[str, Any]) -> None:
        atomic_save(
            {"step": step, **meta, "policy": self.policy.state_dict(),
             "critic": self.critic.state_dict() if self.critic is not None else None,
             "optimizer": self.optimizer.state_dict(), "rng": rng_state()},
            self.path,
        )

    def read(self) -> Dict[str, Any]:
        """The checkpoint (``step`` and the ``meta`` given to :meth:`save`), without restoring anything."""
        return load(self.path)

    def restore(self, state: Dict[str, Any]) -> None:
        """Load models, optimizer and RNG states from what :meth:`read` returned."""
        self.policy.load_state_dict(state["policy"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])


_LATEST = "latest"
"""Name of the file in a sharded checkpoint directory that names the current step directory."""


class ShardedCheckpoint:
    """torch.distributed: ``out_dir/checkpoint/step-NNNNNNNN/`` DCP directories (collective calls).

    ``save`` writes the DCP files and rank 0's ``meta.pt``, then makes the step current by
    rewriting ``latest`` atomically and removes older step directories; a crash mid-save leaves
    the previous checkpoint current. State dicts are keyed by parameter name
    (``get_state_dict``), so DDP and FSDP2 runs of any world size can load them. No RNG state
    is saved: under torch.distributed it derives from (seed, step, rank). The directory must be
    on a file system every rank sees.
    """

    def __init__(self, out_dir: str, models: nn.Module, optimizer, group=None):
        self.directory = os.path.join(out_dir, "checkpoint")
        self.models, self.optimizer, self.group = models, optimizer, group

    def current(self) -> Optional[str]:
        """The current step directory, or ``None``."""
        try:
            with open(os.path.join(self.directory, _LATEST)) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        return os.path.join(self.directory, name)

    def exists(self) -> bool:
        return self.current() is not None

    def save(self, step: int, meta: Dict[str, Any]) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        is_main = dist.get_rank(self.group) == 0
        name = f"step-{step:08d}"
        path = os.path.join(self.directory, name)
        if is_main:
            shutil.rmtree(path, ignore_errors=True)  # a partial save of this step by a crashed run
            os.makedirs(path)
        dist.barrier(group=self.group)
        model_state, optimizer_state = get_state_dict(self.models, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path, process_group=self.group)
        if is_main:
            atomic_save({"step": step, **meta}, os.path.join(path, "meta.pt"))
            atomic_write_text(name, os.path.join(self.directory, _LATEST))
            for entry in os.listdir(self.directory):
                if entry.startswith("step-") and entry != name:
                    shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)
        dist.barrier(group=self.group)

    def read(self) -> Dict[str, Any]:
        """The current step's ``meta.pt`` (``step`` and the ``meta`` given to :meth:`save`)."""
        return load(os.path.join(self.current(), "meta.pt"))

    def restore(self, state: Dict[str, Any]) -> None:
        """Collective: load the current step into the models and optimizer in place (any world size, wrapper)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = self.current()
        model_state, optimizer_state = get_state_dict(self.models, self.optimizer)  # the layout to load into
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=path, process_group=self.group)
        set_state_dict(self.models, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def open_checkpoint(out_dir: str, dp, optimizer, resume: bool):
    """The run's checkpoint: sharded under torch.distributed, a single file otherwise.

    With ``resume``, a checkpoint of the other kind in ``out_dir`` is an error (they are
    not interchangeable) rather than a silent fresh start.
    """
    single = SingleFileCheckpoint(out_dir, dp.models.policy, dp.models.critic, optimizer)
    sharded = ShardedCheckpoint(out_dir, dp.models, optimizer, getattr(dp, "group", None))
    ours, other = (single, sharded) if dp.kind is None else (sharded, single)
    if resume and other.exists() and not ours.exists():
        if dp.kind is None:
            raise ValueError(f"cannot resume: {out_dir} holds a torch.distributed checkpoint (checkpoint/); resume "
                             "it under torchrun (--nproc_per_node 1 works)")
        raise ValueError(f"cannot resume: {out_dir} holds a single-process checkpoint.pt; resume it without "
                         "torch.distributed (or set data_parallel='none')")
    return ours
