"""SIGKILL during checkpoint writes loses nothing and leaves no stray files.

A child process trains with a checkpoint after every step and kills itself with SIGKILL at a
chosen point of the k-th write of ``checkpoint.pt`` it makes, named by what has happened to
the files by then, not by how many os calls came before (so a new fsync or write elsewhere moves
no kill point):

* ``rename-current-to-previous``: the new checkpoint is written and fsynced under a temporary
  name; nothing is renamed yet;
* ``rename-temporary-to-current``: also, the current checkpoint was renamed to
  ``checkpoint.prev.pt`` (when there was one): no ``checkpoint.pt`` on disk;
* ``fsync-directory``: both renames done, the directory not yet fsynced.

Each later child resumes. The run that survives all the kills ends with the same records and
weights as an uninterrupted one, and no temporary file is left in the run folder. (The order of
the writes themselves is checked call by call in ``test_checkpoint.py``.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from test_ppo import EOS, PAD, build
    import rlhf_fast as rf
    from rlhf_fast.training import checkpoint

    kill = os.environ.get("KILL_AT", "")
    if kill:  # "POINT:K": SIGKILL ourselves at POINT of the K-th write of checkpoint.pt that reaches it
        point, count = kill.split(":")
        seen = {{"rename-current-to-previous": 0, "rename-temporary-to-current": 0, "fsync-directory": 0}}
        assert point in seen, point
        after_rename = [False]  # the next directory fsync is the one of a checkpoint.pt write
        replace, fsync = os.replace, os.fsync

        def reached(name):
            seen[name] += 1
            if name == point and seen[name] == int(count):
                os.kill(os.getpid(), signal.SIGKILL)

        def killing_replace(src, dst):
            src_name, dst_name = os.path.basename(src), os.path.basename(dst)
            if (src_name, dst_name) == ("checkpoint.pt", "checkpoint.prev.pt"):
                reached("rename-current-to-previous")
            elif dst_name == "checkpoint.pt":
                reached("rename-temporary-to-current")
                after_rename[0] = True
            return replace(src, dst)

        def killing_fsync(fd):
            if after_rename[0] and os.path.isdir("/proc/self/fd/%d" % fd):
                after_rename[0] = False
                reached("fsync-directory")
            return fsync(fd)

        checkpoint.os.replace, checkpoint.os.fsync = killing_replace, killing_fsync
    policy, ref, reward_model, prompts = build("gpt2")
    cfg = rf.PPOConfig(
        seed=5, steps=5, batch=2, samples_per_prompt=2, minibatch_size=2, epochs=1, lr=3e-3, max_new_tokens=4,
        loss_backend="eager", adaptive_kl=True, kl_coef=0.2, kl_target=0.05, kl_horizon=20.0,
        checkpoint_every=1, out_dir={out!r}, resume=True, progress=False,
    )
    records = rf.train_ppo(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
    torch.save({{"records": [{{k: v for k, v in r.to_dict().items() if k != "step_time_s"}} for r in records],
                "weights": policy.state_dict()}}, {result!r})
    """
)


def _child(tmp_path, out_dir, result, kill=""):
    code = CHILD.format(tests=os.path.dirname(__file__), out=str(out_dir), result=str(result))
    env = dict(os.environ, KILL_AT=kill, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _steps(run):
    """The steps of checkpoint.pt and checkpoint.prev.pt in ``run`` (None where absent)."""
    from rlhf_fast.training.checkpoint import load

    return tuple(load(str(run / name))["step"] if (run / name).exists() else None
                 for name in ("checkpoint.pt", "checkpoint.prev.pt"))


def test_sigkill_during_checkpoint_writes_loses_nothing(tmp_path):
    clean = _child(tmp_path, tmp_path / "clean", tmp_path / "clean.pt")
    assert clean.returncode == 0, clean.stderr[-3000:]
    run = tmp_path / "killed"
    # what each child finds on resuming, where it dies, and the steps of (checkpoint.pt, checkpoint.prev.pt) it leaves
    kills = [
        ("rename-temporary-to-current:1", (None, None)),  # nothing yet: dies in its first write, before it has a name
        ("rename-temporary-to-current:2", (None, 1)),  # nothing yet: writes step 1, dies in step 2's: only the .prev
        ("rename-current-to-previous:1", (2, 1)),  # resumes from .prev (step 1); writes step 2, dies in step 3's
        ("fsync-directory:1", (3, 2)),  # resumes from step 2; dies in step 3's write after both renames
        ("rename-temporary-to-current:1", (None, 3)),  # resumes from step 3; dies in step 4's between the renames
    ]
    for kill, left in kills:
        proc = _child(tmp_path, run, tmp_path / "unused.pt", kill)
        assert proc.returncode == -signal.SIGKILL, (f"{kill}: the child was not killed there (point never reached?)",
                                                    proc.returncode, proc.stderr[-3000:])
        assert _steps(run) == left, kill
    survivor = _child(tmp_path, run, tmp_path / "killed.pt")
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    want, got = torch.load(tmp_path / "clean.pt"), torch.load(tmp_path / "killed.pt")
    assert got["records"] == want["records"]
    for name, value in want["weights"].items():
        assert torch.equal(got["weights"][name], value), name
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    with open(run / "metrics.jsonl") as f:
        assert len(f.readlines()) == 5
