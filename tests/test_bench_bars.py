"""The benchmarks' bars are asserted where they are measured, and a failing one is named.

* ``bars.Bar``: the verdict (NaN, a number that could not be measured, fails) and the message.
* CPU: each benchmark run in this process at a tiny shape (timing off, as CI runs them; memory
  numbers stubbed) fails naming its bar when a regression is planted: its fast path made slow
  (a pause far beyond the work, so the verdict does not hang on the noise of a shared machine),
  or its memory eager-sized. (That the real paths meet the bars at the CI shapes is the
  benchmarks' own run.)
* GPU: the bars of ``ppo_loss_cases.gpu_bars`` on made-up medians, and ``gpu_check.sh`` itself
  run with a stand-in for python (no GPU here) that lets each step pass or fail: its exit status
  is 1 and a ``FAILED:`` line names each failing bar and step, 0 when all pass.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bars  # noqa: E402
import gpu_summary  # noqa: E402
import ppo_loss_cases  # noqa: E402


def test_a_bar_is_met_or_named_with_its_value_and_bound():
    assert bars.at_least("speed-up", 4.0, 4.0).ok and not bars.at_least("speed-up", 3.99, 4.0).ok
    assert bars.at_most("memory", 0.45, 0.45).ok and not bars.at_most("memory", 0.46, 0.45).ok
    assert not bars.at_least("speed-up", math.nan, 4.0).ok and not bars.at_most("memory", math.nan, 1.0).ok
    bars.assert_bars([bars.at_least("a", 5.0, 4.0)], "here")
    with pytest.raises(AssertionError, match=r"here: bar not met: b 0\.3 \(bar ≤ 0\.2: FAILED\)$"):
        bars.assert_bars([bars.at_least("a", 5.0, 4.0), bars.at_most("b", 0.3, 0.2)], "here")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: on a loaded 2-core machine two threads only contend (20× slower)
    yield
    torch.set_num_threads(threads)


class _Benchmark:
    """What the benchmarks ask of pytest-benchmark's fixture, with timing off (as CI runs them)."""

    disabled = True

    def __init__(self):
        self.extra_info, self.group = {}, None


def _slowed(step, seconds: float = 0.2):
    """``step`` plus a pause far longer than the tiny shapes' work (ms): the planted regression's speed, robust
    to the noise of a shared machine."""

    def slow(*args):
        time.sleep(seconds)
        return step(*args)

    return slow


def test_the_cpp_bars_fail_when_the_cpp_path_is_slow(monkeypatch):
    import bench_cpu

    monkeypatch.setattr(bench_cpu, "SHAPE", dict(n=64, v=4000))
    monkeypatch.setattr(bench_cpu, "measure_peak_memory", lambda workload, backend, n, v: 1000.0)
    logprobs = bench_cpu.WORKLOADS["logprobs"]
    slow = _slowed(logprobs)
    monkeypatch.setitem(bench_cpu.WORKLOADS, "logprobs",
                        lambda backend, *inputs: (slow if backend == "cpp" else logprobs)(backend, *inputs))
    with pytest.raises(AssertionError, match=r"bar not met: logprobs speed-up over eager \S+ \(bar ≥ 3: FAILED\)$"):
        bench_cpu.test_cpu_logprobs_with_entropy(_Benchmark())


def test_the_logprobs_grad_bars_fail_when_the_cpp_path_is_slow(monkeypatch):
    import bench_logprobs_grad as grad

    monkeypatch.setattr(grad, "LOGITS_SHAPE", dict(n=64, v=4000))
    grad_bytes = 64 * 4000 * 4  # logits.grad: the peer path's extra is 2× that, ours 1 %
    monkeypatch.setattr(grad, "measure_peak_memory",
                        lambda form, path, n, v: grad_bytes * (3 if path == "peer-eager" else 1.01))
    step, slow = grad.logits_step, _slowed(grad.logits_step)
    monkeypatch.setattr(grad, "logits_step", lambda path, *inputs: (slow if path == "cpp" else step)(path, *inputs))
    with pytest.raises(AssertionError, match=r"bar not met: speed-up over the peer eager path \S+ \(bar ≥ 5: "
                                             r"FAILED\)$"):
        grad.test_cpu_logprobs_grad_vs_peer_eager(_Benchmark())


def test_the_fused_linear_bar_fails_on_eager_sized_memory(monkeypatch):
    import bench_fused_linear as fused

    monkeypatch.setattr(fused, "CPU_SHAPE", dict(n=64, h=16, v=4000))
    monkeypatch.setattr(fused, "STEPS", dict(fused.STEPS, eager=_slowed(fused.eager_step)))  # the time bar holds
    monkeypatch.setattr(fused, "measure_peak_memory", lambda path, n, h, v: 3 * n * v * 4.0)  # an [N, V] fused path
    with pytest.raises(AssertionError, match=r"bar not met: peak memory over eager's 1 \(bar ≤ 0\.35: FAILED\)$"):
        fused.test_cpu_fused_linear_vs_eager(_Benchmark(), "fused")


def test_the_variant_bar_fails_when_a_variant_is_slow(monkeypatch):
    import bench_policy_variants as variants

    monkeypatch.setattr(variants, "ROWS", {"logits": 256, "fused-linear": 256})
    monkeypatch.setattr(variants, "SHAPE", dict(h=32, v=4000))
    monkeypatch.setattr(variants, "_inputs", {})
    step, slow = variants.step, _slowed(variants.step)
    monkeypatch.setattr(variants, "step", lambda form, loss, *inputs: (step if loss == "ppo" else slow)(form, loss,
                                                                                                      *inputs))
    bar = r"bar not met: cispo call over the plain PPO call's \(fastest runs\) \S+ \(bar ≤ 1\.2"
    with pytest.raises(AssertionError, match=bar):
        variants.test_cpu_variant_vs_plain_ppo(_Benchmark(), "logits", "cispo")


# ----------------------------------------------------------------------------------
# GPU: the bars and gpu_check.sh's exit status
# ----------------------------------------------------------------------------------

ROOFLINE_S = ppo_loss_cases.bytes_moved(ppo_loss_cases.GPU_BAR_SHAPE, "fwd+bwd") / 3000e9  # at 3000 GB/s


def _gpu(fused=ROOFLINE_S / 0.9, eager=ROOFLINE_S * 5, compiled=ROOFLINE_S * 2, copy=3000.0, why=None):
    return {b.name: b for b in ppo_loss_cases.gpu_bars({"fused": fused, "eager": eager, "compiled": compiled},
                                                         copy, why)}


def test_the_gpu_bars():
    assert all(b.ok for b in _gpu().values())  # 90 % of the copy bandwidth, 4.5× eager, 1.8× compile
    slow = _gpu(fused=ROOFLINE_S / 0.82)  # 82 %: 4.1× eager, 1.64× compile
    assert [b.ok for b in slow.values()] == [False, True, True]
    assert slow["fused fwd+bwd fraction of the measured copy bandwidth"].value == pytest.approx(0.82)
    assert [b.ok for b in _gpu(eager=ROOFLINE_S * 4.4).values()] == [True, False, True]
    assert [b.ok for b in _gpu(compiled=ROOFLINE_S * 1.6).values()] == [True, True, False]
    missing = _gpu(eager=None, copy=None, why={"eager": "out of memory"})
    assert [b.ok for b in missing.values()] == [False, False, True]
    assert "fused fwd+bwd speed-up over eager (not measured: eager: out of memory)" in missing


STUB = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stands in for python in gpu_check.sh: each step's outcome comes from the environment.
    case "$*" in
      *gpu_summary.py*) exec "$REAL_PYTHON" "$@" ;;
      *ppo_loss_cases.py*--sweep*) echo "sweep"; exit 0 ;;
      *ppo_loss_cases.py*)
        out="${@: -3:1}"
        echo "| table |" > "$out/ppo_loss_table.md"
        printf '%s' "$STUB_BARS" > "$out/ppo_loss_bars.json"
        exit "$STUB_BENCH_RC" ;;
      *"-m pytest"*) echo "passed"; exit "$STUB_TESTS_RC" ;;
      *) exit 0 ;;
    esac
    """)


def _gpu_check(tmp_path, bars_met=(True, True, True), tests_rc=0):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    bar_rows = [dict(name=name, value=1.0, bound=1.0, at_least=True, ok=ok, text=f"{name} (bar ≥ 1: "
                     f"{'met' if ok else 'FAILED'})") for name, ok in zip(("roofline", "eager", "compile"), bars_met)]
    env = dict(os.environ, PYTHON=str(stub), REAL_PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               STUB_BARS=json.dumps(bar_rows), STUB_BENCH_RC="0" if all(bars_met) else "1",
               STUB_TESTS_RC=str(tests_rc))
    # the bench step is run as `$PY .../ppo_loss_cases.py --out $OUT --rounds 5`: the stub finds $OUT there
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_check_exits_zero_only_when_every_step_and_bar_passes(tmp_path):
    done = _gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Every step passed and every bar is met." in (tmp_path / "out" / "gpu_results.md").read_text()


def test_gpu_check_names_a_failing_bar_and_exits_one(tmp_path):
    done = _gpu_check(tmp_path, bars_met=(True, False, True))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAILED: bar not met: eager (bar ≥ 1: FAILED)" in done.stderr
    assert "FAILED: step bench_ppo_loss failed (exit code 1" in done.stderr
    assert "roofline" not in done.stderr


def test_gpu_check_names_a_failing_test_step(tmp_path):
    done = _gpu_check(tmp_path, tests_rc=1)
    assert done.returncode == 1
    assert "FAILED: step tests_triton failed (exit code 1; see tests_triton.log)" in done.stderr
    assert "FAILED: step tests_grid failed" in done.stderr


def test_gpu_summary_fails_when_the_bars_were_never_measured(tmp_path):
    (tmp_path / "steps.tsv").write_text("tests_triton\tno pytest\t0\nbench_ppo_loss\t124\t200\n")
    assert gpu_summary.failures(str(tmp_path)) == [
        "step bench_ppo_loss failed (cut by its time limit; see bench_ppo_loss.log)",
        "the bars were not measured (no ppo_loss_bars.json; see bench_ppo_loss.log)"]
    assert gpu_summary.main([str(tmp_path), "5"]) == 1
    assert "**FAILED**" in (tmp_path / "gpu_results.md").read_text()
