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

import glob
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .seeding import rng_state, set_rng_state

_TEMPORARY_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True,
                 keep_previous: Optional[str] = None) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it to ``path``.

    With ``keep_previous``, the file being replaced is first renamed to that path (so a reader
    that finds ``path`` unreadable, or missing after a crash between the two renames, can fall
    back to it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TEMPORARY_PREFIX, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str, keep_previous: Optional[str] = None) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), keep_previous=keep_previous)


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def load(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (on CPU; it holds RNG states and dicts)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def remove_stray_temporaries(directory: str) -> int:
    """Delete the temporary files that writes killed mid-way left in ``directory``; returns how many."""
    stray = glob.glob(os.path.join(glob.escape(directory), _TEMPORARY_PREFIX + "*"))
    for path in stray:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return len(stray)


def _read_first(paths, keys) -> Dict[str, Any]:
    """The first readable checkpoint among ``paths`` (each holding ``keys``), warning about each bad one."""
    problems = []
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            state = load(path)
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"it lacks {missing}")
        except Exception as exc:  # a truncated or foreign file: try the previous checkpoint
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
            warnings.warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); trying the previous one",
                          RuntimeWarning, stacklevel=3)
            continue
        return state
    raise ValueError("cannot resume: no readable checkpoint (" + "; ".join(problems) + ")")


class SingleFileCheckpoint:
    """One process: models, optimizer, RNG states and ``meta`` in ``out_dir/checkpoint.pt``.

    The checkpoint it replaces stays as ``checkpoint.prev.pt``; :meth:`read` falls back to it
    (with a warning) when the current file is unreadable or missing.
    """

    _KEYS = ("step", "policy", "optimizer", "rng")

    def __init__(self, out_dir: str, policy: nn.Module, critic: Optional[nn.Module], optimizer):
        self.path = os.path.join(out_dir, "checkpoint.pt")
        self.previous = os.path.join(out_dir, "checkpoint.prev.pt")
        self.policy, self.critic, self.optimizer = policy, critic, optimizer

    def exists(self) -> bool:
        return os.path.exists(self.path) or os.path.exists(self.previous)

    def save(self, step: int, meta: Dict[str, Any]) -> None:
        atomic_save(
            {"step": step, **meta, "policy": self.policy.state_dict(),
             "critic": self.critic.state_dict() if self.critic is not None else None,
             "optimizer": self.optimizer.state_dict(), "rng": rng_state()},
            self.path, keep_previous=self.previous,
        )

    def read(self) -> Dict[str, Any]:
        """The newest readable checkpoint (``step`` and the ``meta`` given to :meth:`save`); restores nothing."""
        return _read_first((self.path, self.previous), self._KEYS)

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
    rewriting ``latest`` atomically and keeps the step before it (older ones are removed); a crash
    mid-save leaves the previous checkpoint current, and :meth:`read` falls back to the one before
    when the current one's ``meta.pt`` is unreadable. State dicts are keyed by parameter name
    (``get_state_dict``), so DDP and FSDP2 runs of any world size can load them. No RNG state
    is saved: under torch.distributed it derives from (seed, step, rank). The directory must be
    on a file system every rank sees.
    """

    def __init__(self, out_dir: str, models: nn.Module, optimizer, group=None):
        self.directory = os.path.join(out_dir, "checkpoint")
        self.models, self.optimizer, self.group = models, optimizer, group
        self._chosen: Optional[str] = None  # the step directory read() picked

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

    def _steps(self):
        """Step directories, newest first."""
        names = sorted((e for e in os.listdir(self.directory) if e.startswith("step-")), reverse=True)
        return [os.path.join(self.directory, n) for n in names]

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
            for old in self._steps()[2:]:  # keep this step and the one before
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier(group=self.group)

    def read(self) -> Dict[str, Any]:
        """The current step's ``meta.pt`` (``step`` and the ``meta`` given to :meth:`save`), or the previous
        step's when it is unreadable."""
        current = self.current()
        candidates = [current] + [p for p in self._steps() if p != current and os.path.basename(p) <
                                  os.path.basename(current)]
        state = _read_first([os.path.join(p, "meta.pt") for p in candidates], ("step",))
        self._chosen = os.path.join(self.directory, f"step-{state['step']:08d}")
        return state

    def restore(self, state: Dict[str, Any]) -> None:
        """Collective: load the current step into the models and optimizer in place (any world size, wrapper)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = self._chosen or self.current()
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
    if dp.is_main:  # temporaries of writes a crash interrupted (metrics.jsonl, checkpoints)
        remove_stray_temporaries(out_dir)
        remove_stray_temporaries(os.path.join(out_dir, "checkpoint"))
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
