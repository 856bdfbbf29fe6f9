"""The benchmark suites state their point at the end of a run, without ``-s``: each implementation's
speed (and memory, where measured) against the eager reference of the same run, as "N× faster than
eager". Runs a cheap slice of the CI smoke run (``--benchmark-disable``) in a fresh pytest."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TITLE = "against the eager reference, measured in the same run"


def test_smoke_run_prints_the_speedups_against_eager():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_ppo_loss.py", "benchmarks/bench_cpu.py", "-q",
         "--benchmark-disable", "-p", "no:cacheprovider", "-k", "fwd-eager or fwd-fused or logprobs"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert TITLE in out, out[-3000:]
    summary = out[out.index(TITLE):]
    speed = r"\d+(\.\d+)?× (faster|slower) than eager \(\S+ s vs \S+ s, one run each, timing off: indicative only\)"
    assert re.search(r"fwd-eager\]: the baseline \(\S+ s, one run\)", summary), summary
    assert re.search(r"fwd-fused\]: fused " + speed, summary), summary
    assert re.search(r"test_cpu_logprobs_with_entropy: cpp " + speed
                     + r"; peak memory above the inputs \S+× eager's \(\d+ vs \d+ MiB\)", summary), summary
    assert "In pytest-benchmark's table" not in summary  # that note only when the table is shown
