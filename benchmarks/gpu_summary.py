"""The end of ``gpu_check.sh``: ``$OUT/gpu_results.md`` and the run's exit status.

``python benchmarks/gpu_summary.py OUT TOTAL_SECONDS`` reads what the steps left in ``OUT``
(``steps.tsv``: name, exit code, seconds per step; each step's log; the benchmark's table and
``ppo_loss_bars.json``), writes ``gpu_results.md``, prints every failure and exits 1 when there
is one: a step that failed or was cut by its time limit (exit code 124), a bar not met, or bars
that were never measured. A step that could not run for want of pytest is listed, not failed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Tuple

NOT_RUN = "no pytest"
BARS_FILE = "ppo_loss_bars.json"
BARS_TEXT = ("Bars: fused fwd+bwd ≥ 85 % of the measured bandwidth roofline, ≥ 4× eager and ≥ 1.5× torch.compile "
             "at N = 16384, V = 151936, bf16.")


def _read(out: str, name: str) -> str:
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return ""


def failures(out: str) -> List[str]:
    """Every failing step and bar of the run in ``out``, one line each (empty: all passed)."""
    found = []
    for row in _read(out, "steps.tsv").splitlines():
        name, rc, _seconds = row.split("\t")
        if rc not in ("0", NOT_RUN):
            why = "cut by its time limit" if rc == "124" else f"exit code {rc}"
            found.append(f"step {name} failed ({why}; see {name}.log)")
    try:
        bars = json.loads(_read(out, BARS_FILE))
    except ValueError:
        return found + [f"the bars were not measured (no {BARS_FILE}; see bench_ppo_loss.log)"]
    found += [f"bar not met: {bar['text']}" for bar in bars if not bar["ok"]]
    return found


def summarize(out: str, total_seconds: str) -> Tuple[str, List[str]]:
    """(the markdown of gpu_results.md, the failures)."""
    failed = failures(out)
    lines = ["# rlhf_fast GPU check (Triton backend)", "", "```", _read(out, "environment.log").strip(), "```", "",
             f"Total {total_seconds} s. " + ("**FAILED**:" if failed else "Every step passed and every bar is met."),
             *[f"- {line}" for line in failed], "",
             "| step | exit code | seconds | last line |", "|---|---|---|---|"]
    for row in _read(out, "steps.tsv").splitlines():
        name, rc, seconds = row.split("\t")
        log = [line for line in _read(out, f"{name}.log").splitlines() if line.strip()]
        last = log[-1].replace("|", "/")[:160] if log else ""
        lines.append(f"| {name} | {rc} | {seconds} | {last} |")
    lines += ["", "## rf.ppo_loss benchmark", "",
              _read(out, "ppo_loss_table.md") or "(no table: see bench_ppo_loss.log)", "",
              "Effective GB/s = bytes the fused kernels must move (forward N·V·b, forward + backward 3·N·V·b) / time; "
              "% of copy BW against the device copy bandwidth measured in the same run. " + BARS_TEXT,
              "", "## Launch-config sweep", "", _read(out, "launch_sweep.md") or "(no sweep: see launch_sweep.log)",
              "", "## Static model of the same kernels (modelled, not measured)", "",
              _read(out, "static_roofline.md") or "(no table: see static_model.log)"]
    for name in ("tests_triton", "tests_grid"):
        failed_tests = [line for line in _read(out, f"{name}.log").splitlines() if line.startswith(("FAILED", "ERROR"))]
        if failed_tests:
            lines += ["", f"## {name}: failures", "", "```", *failed_tests[:40], "```"]
    return "\n".join(lines) + "\n", failed


def main(argv: List[str]) -> int:
    out, total = argv
    text, failed = summarize(out, total)
    with open(os.path.join(out, "gpu_results.md"), "w") as f:
        f.write(text)
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
