"""SIGKILL during checkpoint writes loses nothing and leaves no stray files.

A child process trains with a checkpoint after every step and kills itself with SIGKILL at a
chosen point of a write: after the temporary file is written and fsynced but before it is renamed,
or between the two renames that keep the previous checkpoint. Each later child resumes. The run
that survives all the kills ends with the same records and weights as an uninterrupted one, and no
temporary file is left in the run folder.
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
    if kill:  # "fsync:K" or "replace:K": SIGKILL ourselves at the K-th call, inside a write
        name, count = kill.split(":")
        calls = [0]
        original = getattr(checkpoint.os, name)

        def killing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(count):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(checkpoint.os, name, killing)
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


def test_sigkill_during_checkpoint_writes_loses_nothing(tmp_path):
    clean = _child(tmp_path, tmp_path / "clean", tmp_path / "clean.pt")
    assert clean.returncode == 0, clean.stderr[-3000:]
    run = tmp_path / "killed"
    # write 1 is metrics.jsonl at the start; checkpoint k is written after step k
    # each child resumes, then dies: in its first checkpoint write, between the renames that keep the previous
    # checkpoint, after the current one went missing, ...
    for kill in ("fsync:2", "replace:4", "fsync:3", "replace:3", "replace:5"):
        proc = _child(tmp_path, run, tmp_path / "unused.pt", kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stderr[-3000:])
    survivor = _child(tmp_path, run, tmp_path / "killed.pt")
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    want, got = torch.load(tmp_path / "clean.pt"), torch.load(tmp_path / "killed.pt")
    assert got["records"] == want["records"]
    for name, value in want["weights"].items():
        assert torch.equal(got["weights"][name], value), name
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    with open(run / "metrics.jsonl") as f:
        assert len(f.readlines()) == 5
