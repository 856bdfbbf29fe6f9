"""Checkpoint files: reading one never runs code from it, and writing one is ordered for durability.

* A file crafted so that unpickling it runs a shell command (which would create a marker file)
  is refused with an error that says so, and the marker never appears: ``checkpoint.pt`` through
  ``train(resume=True)``, a reward model's head, and a torch.distributed (DCP) checkpoint's
  ``meta.pt``, ``.metadata`` and non-tensor items. A raw pickle is not even unpickled.
* What a checkpoint holds reads back weights-only, the RNG states bit-exactly.
* The write order, recorded at the os calls themselves: the data is written in full and fsynced
  before any rename, the previous checkpoint is renamed away before the new one takes its name,
  and the directory is fsynced after the last rename.
"""

from __future__ import annotations

import os
import pickle
import random
import stat

import numpy as np
import pytest
import torch
from test_ppo import EOS, PAD, base_config, build

from rlhf_fast.training import checkpoint, train
from rlhf_fast.training.checkpoint import UnsafeCheckpointError
from rlhf_fast.training.seeding import rng_state, set_rng_state


class _RunsAShellCommand:
    """Unpickling this calls ``os.system(command)``: what a crafted checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _payload(tmp_path):
    marker = tmp_path / "MARKER-code-ran"
    return marker, _RunsAShellCommand(f"touch {marker}")


def _single_file_state(payload):
    return {"step": 2, "policy": {}, "optimizer": payload, "rng": {}, "config": {}, "kl_controller": {},
            "records": []}


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker, payload = _payload(tmp_path)
    cfg = base_config(tmp_path, resume=True, checkpoint_every=1)
    os.makedirs(cfg.out_dir)
    torch.save(_single_file_state(payload), os.path.join(cfg.out_dir, "checkpoint.pt"))  # a torch.save archive
    policy, ref, reward_model, prompts = build("gpt2")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*checkpoint\.pt: it asks for the Python "
                                                    r"object (posix|nt)\.system.*Nothing in it was run"):
        train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
    assert not marker.exists()
    # even with a readable previous checkpoint beside it, a crafted current one stops the resume
    torch.save(_single_file_state({}), os.path.join(cfg.out_dir, "checkpoint.prev.pt"))
    with pytest.raises(UnsafeCheckpointError):
        checkpoint.SingleFileCheckpoint(cfg.out_dir, policy, None, None).read()
    assert not marker.exists()


def test_a_raw_pickle_is_never_unpickled(tmp_path):
    """torch.save writes zip archives; a file that is not one is unreadable, never handed to an unpickler."""
    marker, payload = _payload(tmp_path)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps(_single_file_state(payload)))
    with pytest.raises(ValueError, match="is not a torch.save archive"):
        checkpoint.load(str(path))
    with pytest.warns(RuntimeWarning, match="unreadable"), pytest.raises(ValueError, match="no readable checkpoint"):
        checkpoint.SingleFileCheckpoint(str(tmp_path), None, None, None).read()
    assert not marker.exists()


def test_a_crafted_reward_head_is_refused(tmp_path):
    from rlhf_fast.training.reward import load_reward_model, save_reward_model

    marker, payload = _payload(tmp_path)
    _, _, reward_model, _ = build("gpt2")
    save_reward_model(reward_model, str(tmp_path / "rm"))
    assert torch.equal(load_reward_model(str(tmp_path / "rm")).head.weight, reward_model.head.weight)
    torch.save({"head": payload}, tmp_path / "rm" / "reward_head.pt")
    with pytest.raises(UnsafeCheckpointError, match="reward_head.pt"):
        load_reward_model(str(tmp_path / "rm"))
    assert not marker.exists()


def test_checkpoint_contents_load_weights_only_and_restore_the_rngs_bit_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # numpy caches the second Gaussian of a pair: that part of its state too
    checkpoint.atomic_save({"rng": rng_state()}, str(tmp_path / "rng.pt"))
    want = (random.random(), np.random.randn(5).tolist(), np.random.randint(0, 10**9, 3).tolist(), torch.rand(4))
    set_rng_state(checkpoint.load(str(tmp_path / "rng.pt"))["rng"])
    got = (random.random(), np.random.randn(5).tolist(), np.random.randint(0, 10**9, 3).tolist(), torch.rand(4))
    assert want[:3] == got[:3] and torch.equal(want[3], got[3])


# ----------------------------------------------------------------------------------
# torch.distributed checkpoints (DCP directories), one gloo process
# ----------------------------------------------------------------------------------


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded(out_dir, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return checkpoint.ShardedCheckpoint(str(out_dir), model, optimizer), model, optimizer


def _append_item(step_dir, fqn: str, blob: bytes) -> None:
    """Point the DCP item ``fqn`` at ``blob``, appended to its data file (the metadata rewritten to match)."""
    import dataclasses

    with open(step_dir / ".metadata", "rb") as f:
        metadata = checkpoint._MetadataUnpickler(f, "test").load()
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    data_file = step_dir / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(blob)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob))
    with open(step_dir / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_a_crafted_distributed_checkpoint_is_refused(tmp_path, process_group):
    import io
    import shutil

    marker, payload = _payload(tmp_path)
    saved, model, _ = _sharded(tmp_path / "run", seed=0)
    saved.save(1, {"config": {}})
    step_dir = tmp_path / "run" / "checkpoint" / "step-00000001"

    def fresh():
        ours, other_model, other_optimizer = _sharded(tmp_path / "run", seed=1)
        return ours, other_model, other_optimizer

    ours, other_model, other_optimizer = fresh()  # the untouched checkpoint restores
    ours.restore(ours.read())
    assert torch.equal(other_model.weight, model.weight) and other_optimizer.param_groups[0]["lr"] == 1e-3

    clean = tmp_path / "clean"
    shutil.copytree(step_dir, clean)
    blob = io.BytesIO()
    torch.save(payload, blob)
    for what in ("meta.pt", ".metadata", "optimizer item"):
        shutil.rmtree(step_dir)
        shutil.copytree(clean, step_dir)
        if what == "meta.pt":
            torch.save({"step": 1, "config": payload}, step_dir / "meta.pt")
        elif what == ".metadata":
            (step_dir / ".metadata").write_bytes(pickle.dumps(payload))
        else:
            _append_item(step_dir, "optimizer.param_groups.0.lr", blob.getvalue())
        ours, _, _ = fresh()
        with pytest.raises(UnsafeCheckpointError, match=r"(posix|nt)\.system.*Nothing in it was run"):
            ours.restore(ours.read())
        assert not marker.exists(), what


# ----------------------------------------------------------------------------------
# The write order
# ----------------------------------------------------------------------------------


class _Recorder:
    """Records fsync / rename calls of this process with what they act on (inode, size, kind)."""

    def __init__(self, monkeypatch):
        self.events = []
        fsync, replace = os.fsync, os.replace

        def recording_fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", st.st_ino, st.st_size, stat.S_ISDIR(st.st_mode)))
            return fsync(fd)

        def recording_replace(src, dst):
            self.events.append(("replace", os.stat(src).st_ino, os.path.basename(src), os.path.basename(dst)))
            return replace(src, dst)

        monkeypatch.setattr(checkpoint.os, "fsync", recording_fsync)
        monkeypatch.setattr(checkpoint.os, "replace", recording_replace)


@pytest.mark.parametrize("previous", [False, True], ids=["first-write", "replacing"])
def test_atomic_save_writes_fsyncs_renames_then_fsyncs_the_directory(tmp_path, monkeypatch, previous):
    path, keep = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    if previous:
        checkpoint.atomic_save({"step": 1}, str(path))
    old_inode = path.stat().st_ino if previous else None
    recorder = _Recorder(monkeypatch)
    checkpoint.atomic_save({"step": 2, "weights": torch.arange(10000.0)}, str(path), keep_previous=str(keep))
    new, directory = path.stat(), tmp_path.stat().st_ino
    events = recorder.events
    assert [e[0] for e in events] == ["fsync"] + ["replace"] * (2 if previous else 1) + ["fsync"], events
    # the new file, whole (flushed: its final size), is fsynced before any name points to it
    assert events[0] == ("fsync", new.st_ino, new.st_size, False)
    renames = [e[1:] for e in events[1:-1]]
    if previous:  # the current checkpoint steps aside before the new one takes its name
        assert renames.pop(0) == (old_inode, "checkpoint.pt", "checkpoint.prev.pt")
    (inode, source, target), = renames
    assert (inode, target) == (new.st_ino, "checkpoint.pt") and source.startswith(".tmp-")
    assert events[-1][0::3] == ("fsync", True) and events[-1][1] == directory  # then the directory: renames on disk
    assert checkpoint.load(str(path))["step"] == 2
    if previous:
        assert checkpoint.load(str(keep))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["checkpoint.prev.pt"] if previous else []) + [
        "checkpoint.pt"]


def test_text_files_are_written_in_the_same_order(tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    checkpoint.atomic_write_text("step-00000003", str(tmp_path / "latest"))
    kinds = [(e[0], e[-1]) if e[0] == "fsync" else (e[0], e[3]) for e in recorder.events]
    assert kinds == [("fsync", False), ("replace", "latest"), ("fsync", True)]
    assert (tmp_path / "latest").read_text() == "step-00000003"
    assert recorder.events[0][1:3] == ((tmp_path / "latest").stat().st_ino, 13)  # flushed: all 13 characters


def test_a_failed_write_leaves_the_current_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"step": 1}, str(path))

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(str(path), failing, keep_previous=str(tmp_path / "checkpoint.prev.pt"))
    assert checkpoint.load(str(path))["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
