"""One line per benchmark saying how it compares with the eager reference measured in the same run.

A benchmark puts the line in ``benchmark.extra_info["vs_eager"]``; ``conftest.py`` prints every
such line in a section of pytest's terminal summary, so the point of a run shows without ``-s``
(and with ``--benchmark-disable``, where the benchmarks time their rounds by hand: the bars need medians).
"""

from __future__ import annotations

from typing import Optional


def times_faster(eager_s: float, other_s: float) -> str:
    """``"12.3× faster than eager"`` (or ``"1.4× slower than eager"``) from two times in seconds."""
    if other_s <= 0 or eager_s <= 0:
        return "not timed"
    ratio = eager_s / other_s
    if ratio >= 1:
        return f"{ratio:.3g}× faster than eager"
    return f"{1 / ratio:.3g}× slower than eager"


def memory_vs_eager(eager_bytes: Optional[float], other_bytes: Optional[float]) -> str:
    """``"peak memory above the inputs 0.19× eager's (504 vs 2633 MiB)"``, or "" when not measured."""
    if eager_bytes is None or other_bytes is None or eager_bytes <= 0:
        return ""
    return (f"peak memory above the inputs {other_bytes / eager_bytes:.2g}× eager's "
            f"({other_bytes / 2**20:.0f} vs {eager_bytes / 2**20:.0f} MiB)")


def line(name: str, eager_s: float, other_s: float, runs: int, eager_bytes: Optional[float] = None,
         other_bytes: Optional[float] = None) -> str:
    """The summary line: speed (medians of ``runs`` interleaved runs), then memory when measured."""
    how = "one run each, timing off: indicative only" if runs == 1 else f"medians of {runs} runs"
    parts = [f"{name} {times_faster(eager_s, other_s)} ({other_s:.3g} s vs {eager_s:.3g} s, {how})"]
    memory = memory_vs_eager(eager_bytes, other_bytes)
    if memory:
        parts.append(memory)
    return "; ".join(parts)
