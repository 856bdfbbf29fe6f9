"""A backend that is expected but fails to load fails the run instead of skipping its tests.

``RLHF_FAST_REQUIRE_BACKENDS=cpp,triton`` (set by the Makefile's test targets) makes the suite
stop before collecting anything, naming each required backend that did not load and why. Here
a child pytest runs with the C++ extension and triton made unimportable (a ``None`` entry in
``sys.modules``, what a corrupt or missing build looks like to ``import``).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import REQUIRE_VARIABLE, missing_required_backends

ROOT = pathlib.Path(__file__).resolve().parents[1]
BROKEN = "import sys; sys.modules['rlhf_fast._C'] = None; sys.modules['triton'] = None; import pytest; " \
         "sys.exit(pytest.main([{path!r}, '-q', '-p', 'no:randomly', '-p', 'no:cacheprovider', '--collect-only']))"


def _pytest_with_broken_backends(required, path="tests/test_required_backends.py"):
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_VARIABLE}
    if required is not None:
        env[REQUIRE_VARIABLE] = required
    return subprocess.run([sys.executable, "-c", BROKEN.format(path=path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_required_backend_that_fails_to_load_stops_the_run():
    done = _pytest_with_broken_backends("cpp,triton")
    out = done.stdout + done.stderr
    assert done.returncode == 4, out[-3000:]  # pytest's usage error: nothing collected, nothing run
    assert f"{REQUIRE_VARIABLE}=cpp,triton requires backends that did not load" in out, out[-3000:]
    assert "cpp: ImportError: the C++ extension rlhf_fast._C is not built" in out, out[-3000:]
    assert "triton: ModuleNotFoundError: import of triton halted" in out, out[-3000:]


def test_the_benchmarks_stop_too_when_the_cpp_backend_is_required():
    done = _pytest_with_broken_backends("cpp", "benchmarks/bench_cpu.py")
    out = done.stdout + done.stderr
    assert done.returncode == 4, out[-3000:]
    assert "requires the C++ backend, which did not load: ImportError: the C++ extension" in out, out[-3000:]


def test_without_the_variable_a_missing_backend_only_skips():
    done = _pytest_with_broken_backends(None)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_an_unknown_backend_name_is_an_error():
    assert missing_required_backends(" eager,") == ["eager: not a backend that can be required (cpp, triton)"]
    assert missing_required_backends("") == []
