"""The bars the benchmarks state, asserted where they are measured, and the timing they rest on.

Every bar is a ratio measured in one run: a speed-up over the eager reference (or the peer's
eager path) from medians of interleaved rounds, a policy-loss variant's cost over the plain PPO
call from the fastest of interleaved rounds (bench_policy_variants says why), or a peak-memory ratio
from one fresh process per path. A benchmark asserts each of its bars in every run, the CI-sized
default as well as ``RLHF_FAST_BENCH_FULL=1``, with :func:`assert_bars`, whose message names each
failing bar, its value and its bound.

Timing on a shared machine (:func:`interleaved`): every path runs once per round, in an order
that reverses from one round to the next (A B, B A, ...), so a slow stretch of the machine hits
the paths alike; the bar is on the ratio of the medians (a policy-loss variant's: of the fastest
runs). With ``--benchmark-disable`` (how CI runs the benchmarks) the rounds run all the same, by
hand: pytest-benchmark would time only one.

Why a CI-sized run can carry the bars (numbers in benchmarks/RESULTS.md, "CI-sized bars"): at
the CI shapes the ratios of a fused path against eager sit several times inside their bars,
even on a machine loaded by other jobs, and a regression such a bar exists for (a fallback to
eager, an extra [N, V] buffer) moves the ratio by far more than the noise. The ratio that is
near 1 by design (a policy-loss variant against the plain call, bar ≤ 1.2×) runs where one call
is long enough that per-call overhead does not decide it, with enough rounds that its medians
stayed within ±7 % under load, inside the 20 % to the bar.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, NamedTuple


class Bar(NamedTuple):
    name: str  # what is compared, e.g. "fwd+bwd speed-up over eager"
    value: float  # the measured ratio (NaN when it could not be measured)
    bound: float
    at_least: bool  # the bar is value ≥ bound (else value ≤ bound)

    @property
    def ok(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound  # NaN: False

    def describe(self) -> str:
        sign = "≥" if self.at_least else "≤"
        return f"{self.name} {self.value:.3g} (bar {sign} {self.bound:g}: {'met' if self.ok else 'FAILED'})"


def at_least(name: str, value: float, bound: float) -> Bar:
    return Bar(name, float(value), float(bound), True)


def at_most(name: str, value: float, bound: float) -> Bar:
    return Bar(name, float(value), float(bound), False)


def summary(bars: Iterable[Bar]) -> str:
    """One clause for the end-of-run summary: each bar, its value and whether it is met."""
    return "bars: " + ", ".join(b.describe() for b in bars)


def assert_bars(bars: Iterable[Bar], where: str) -> None:
    """Fail naming every bar that is not met (its value and bound), with ``where`` (the benchmark and shape)."""
    failing = [b for b in bars if not b.ok]
    assert not failing, f"{where}: bar not met: " + "; ".join(b.describe() for b in failing)


def interleaved(benchmark, steps: Dict[str, Callable[[], None]], timed: str, rounds: int) -> Dict[str, List[float]]:
    """Seconds of each step over ``rounds`` interleaved rounds (each step once per round), by name.

    Timing on: pytest-benchmark times ``steps[timed]`` and the other steps run, timed by hand, in
    its untimed ``setup`` of each round. Timing off (``--benchmark-disable``): every step is timed
    by hand, the order reversed every other round.
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}

    def run(name: str) -> None:
        start = time.perf_counter()
        steps[name]()
        times[name].append(time.perf_counter() - start)

    others = [name for name in steps if name != timed]
    if getattr(benchmark, "disabled", False):
        order = list(steps)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                run(name)
    else:
        def setup() -> None:
            for name in others:
                run(name)

        benchmark.pedantic(run, args=(timed,), setup=setup, rounds=rounds, iterations=1)
    return times
