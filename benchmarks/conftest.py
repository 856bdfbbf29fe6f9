"""Collect ``bench_*.py`` here as test modules (pyproject's ``python_files`` is ``test_*.py``).

A collection hook, not a ``benchmarks/pytest.ini``: an ini file here would become the
rootdir config of ``pytest benchmarks/`` and drop pyproject's markers and options.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # shared benchmark modules (ppo_loss_cases)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
