"""Collect ``bench_*.py`` here as test modules (pyproject's ``python_files`` is ``test_*.py``), and
print what each benchmark found against the eager reference at the end of the run.

A collection hook, not a ``benchmarks/pytest.ini``: an ini file here would become the
rootdir config of ``pytest benchmarks/`` and drop pyproject's markers and options.

The summary: a benchmark that puts a line in ``benchmark.extra_info["vs_eager"]`` (see
``versus_eager.py``) gets it printed in a section of pytest's terminal summary, after
pytest-benchmark's own table, with or without ``-s`` and ``--benchmark-disable``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # shared benchmark modules (ppo_loss_cases, versus_eager)

SUMMARY_TITLE = "against the eager reference, measured in the same run"
_LINES = pytest.StashKey[list]()


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.stash[_LINES] = []
    # as in tests/conftest.py: a required C++ backend that did not load stops the run (its CPU bars would skip)
    required = {n.strip() for n in os.environ.get("RLHF_FAST_REQUIRE_BACKENDS", "").split(",")}
    if "cpp" in required:
        from rlhf_fast import backends

        ops, why = backends.load_ops("cpp")
        if ops is None:
            raise pytest.UsageError(f"RLHF_FAST_REQUIRE_BACKENDS requires the C++ backend, which did not load: {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when != "call":
        return
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    text = getattr(benchmark, "extra_info", {}).get("vs_eager") if benchmark is not None else None
    if text:
        item.config.stash[_LINES].append((item.nodeid.split("::")[-1], getattr(benchmark, "group", None), text))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_LINES, [])
    if not lines:
        return
    terminalreporter.section(SUMMARY_TITLE)
    group = object()
    for name, this_group, text in lines:
        if this_group != group:
            group = this_group
            terminalreporter.write_line(f"{this_group or '(no group)'}:")
        terminalreporter.write_line(f"  {name}: {text}")
    if not config.getoption("benchmark_disable", default=False):
        terminalreporter.write_line(
            "(In pytest-benchmark's table a number in parentheses is that row's time over the fastest row's in its "
            "group, so an eager row showing 35.35 took 35× as long as the fastest; the lines above state each "
            "speed-up directly.)")
