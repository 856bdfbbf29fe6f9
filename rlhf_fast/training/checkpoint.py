"""Checkpoints that survive a crash: atomic files, and one interface for two kinds of checkpoint.

* :func:`atomic_save` / :func:`atomic_write_text`: write to a temporary file in the same
  directory, fsync, then ``os.replace``: a crash mid-write leaves the previous file intact.
* :class:`SingleFileCheckpoint` (one process: ``out_dir/checkpoint.pt``) and
  :class:`ShardedCheckpoint` (torch.distributed: ``out_dir/checkpoint/``, DCP directories that
  resume under any world size) share ``exists()``, ``save(step, meta)``, ``read()`` and
  ``restore(state)``;
  :func:`open_checkpoint` picks one and refuses to resume the other kind.

Reading a checkpoint never runs code from it. A run folder may come from anyone (shared, copied,
downloaded), and a pickle can call any function while it is read, so nothing here unpickles with
full pickle: ``checkpoint.pt`` and ``meta.pt`` are read by ``torch.load(weights_only=True)``
(tensors, dicts, lists, tuples, strings, numbers, None: all a checkpoint holds; the RNG states are
stored as tensors and plain values, :func:`~rlhf_fast.training.seeding.rng_state`), and a DCP
directory's metadata and non-tensor items by an unpickler that admits only the classes DCP's
metadata is made of. A file that asks for anything else is refused (:class:`UnsafeCheckpointError`)
before any of it is built.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
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
            os.fsync(f.fileno())  # the data is on disk before any name points to it
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(directory)  # the renames themselves survive a power loss


def fsync_directory(directory: str) -> None:
    """fsync a directory, so that the renames and new entries in it are on disk (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str, keep_previous: Optional[str] = None) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), keep_previous=keep_previous)


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that asks, while it is read, for objects no checkpoint holds (it was refused unread)."""


def _refusal(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: it asks for {what}, which no rlhf_fast checkpoint holds (a checkpoint is tensors "
        "and plain values), so it was not written by rlhf_fast or was altered since. Nothing in it was run. Delete "
        "it (and resume from the checkpoint before it, or start afresh) unless you know where it came from.")


def _global_named(exc: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"the Python object {found.group(1)}" if found else "Python objects beyond tensors and plain values"


def load(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`, on CPU, without running any code from the file.

    ``torch.load(weights_only=True)``: tensors and plain values only. A file that is not a
    ``torch.save`` archive raises ``ValueError`` (unreadable); one whose pickle asks for other
    objects raises :class:`UnsafeCheckpointError`.
    """
    if not zipfile.is_zipfile(path):  # never unpickle what torch.save did not write (its archives are zips)
        raise ValueError(f"{path} is not a torch.save archive")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, _global_named(exc)) from None


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
        except UnsafeCheckpointError:
            raise  # a crafted file: stop, rather than resume from the same folder as if nothing happened
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
        _check_dcp_metadata(path)  # a clear error on every rank before DCP's collective read
        try:
            dcp.load(state, storage_reader=_safe_dcp_reader(path), planner=_safe_dcp_planner(path),
                     process_group=self.group)
        except dcp.api.CheckpointException as exc:  # DCP gathers each rank's exception into one
            for inner, _trace in exc.failures.values():
                if isinstance(inner, UnsafeCheckpointError):
                    raise inner from None
            raise
        set_state_dict(self.models, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


# ----------------------------------------------------------------------------------
# Reading DCP directories without full pickle
# ----------------------------------------------------------------------------------

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # torch.layout's pickled form: a lookup of torch's layouts by name
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""What a DCP ``.metadata`` file is made of (torch 2.13-2.14; its dataclasses and enums); dtypes are allowed too."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata from the classes of :data:`_DCP_METADATA_CLASSES` (and torch dtypes), nothing else."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refusal(self.path, f"the Python object {module}.{name}")


def _check_dcp_metadata(path: str) -> None:
    """Refuse a DCP directory whose ``.metadata`` asks for more than DCP's metadata classes."""
    metadata_path = os.path.join(path, ".metadata")
    if os.path.exists(metadata_path):  # a missing file is DCP's error to report
        with open(metadata_path, "rb") as f:
            _MetadataUnpickler(f, metadata_path).load()


def _safe_dcp_reader(path: str):
    """DCP's file-system reader, with the metadata read by :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(metadata_path, "rb") as f:
                metadata = _MetadataUnpickler(f, str(metadata_path)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def _safe_dcp_planner(path: str):
    """DCP's default load planner, with the non-tensor items (optimizer hyper-parameters) read weights-only."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise _refusal(f"{path} (item {read_item.dest_index.fqn})", _global_named(exc)) from None
            plain = io.BytesIO()  # DCP's own load_bytes then reads back these plain values, just written here
            torch.save(obj, plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return Planner()


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
