"""The benchmark suites state their point at the end of a run, without ``-s``: each implementation's
speed (and memory, where measured) against the eager reference of the same run, as "N× faster than
eager", and each bar with its value. Runs a cheap slice of the CI run (``--benchmark-disable``) in a
fresh pytest."""

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
    # timing off, the bars still need medians: each path runs its rounds, timed by hand
    speed = r"\d+(\.\d+)?× (faster|slower) than eager \(\S+ s vs \S+ s, medians of [3-9] runs\)"
    assert re.search(r"fwd-eager\]: the baseline \(\S+ s, median of 3 runs\)", summary), summary
    assert re.search(r"fwd-fused\]: fused " + speed, summary), summary
    assert re.search(r"test_cpu_logprobs_with_entropy: cpp " + speed
                     + r"; peak memory above the inputs \S+× eager's \(\d+ vs \d+ MiB\)"
                     + r"; bars: logprobs speed-up over eager \S+ \(bar ≥ 3: met\)", summary), summary
    assert "In pytest-benchmark's table" not in summary  # that note only when the table is shown
