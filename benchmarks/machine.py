"""What the CPU benchmarks measure about the machine: its name and peak memory (RSS).

Peak memory above the inputs: the kernel's peak-RSS counter (VmHWM) is reset once the
inputs exist (``echo 5 > /proc/self/clear_refs``); after the step, VmHWM minus the RSS at
the reset is the number. glibc must serve large allocations by mmap so that freed tensors
leave the RSS (``MALLOC_MMAP_THRESHOLD_=65536`` for a fresh process, or mallopt in this one),
otherwise a step reuses freed heap pages and its peak shows nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Callable, Optional, Sequence


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        return "unknown"


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_rss_above(step: Callable[[], None]) -> Optional[int]:
    """Bytes of RSS above the current level at the peak of ``step()``; None without /proc."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = status_kib("VmRSS")
    step()
    return (status_kib("VmHWM") - base) * 1024


def release_freed_memory() -> None:
    """In this process: allocations above 64 KiB by mmap (mallopt M_MMAP_THRESHOLD = −3).

    Setting it also stops glibc from raising the threshold by itself. Raises OSError
    without glibc, where an RSS peak would not mean anything.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except (OSError, AttributeError) as exc:
        raise OSError("no glibc mallopt") from exc


def peak_in_fresh_process(script: str, args: Sequence[str]) -> Optional[int]:
    """Run ``script args`` (which prints ``{"peak_above_inputs": bytes}`` last) in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_above_inputs"]


def print_peak(step: Callable[[], None]) -> None:
    """The worker side of :func:`peak_in_fresh_process`."""
    print(json.dumps({"peak_above_inputs": peak_rss_above(step)}))
