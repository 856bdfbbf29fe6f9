"""The case study's bar checks (``report.bar_checks``), each on inputs that fail it and on inputs that pass it.

One made-up seed summary passes every check; each case below changes one or two numbers of it so
that one check fails (every clause of a compound check on its own) or sits exactly on its
threshold, where it must pass (the numbers are exact in binary, so the boundary is exact). For
every case, every check's verdict must equal the criterion written out independently in
``test_casestudy.BAR``, and the named check's verdict and margin must be the expected ones.
"""

from __future__ import annotations

import copy

import pytest
from test_casestudy import BAR

from rlhf_fast.casestudy.report import bar_checks, bar_over_seeds

REFERENCE = {"proxy_reward": 0.0, "proxy_gain": 0.0, "gold": 1.0, "length": 2.0, "refusal_rate": 0.75, "kl": 0.0}
BASELINE = {"proxy_reward": 3.0, "proxy_gain": 3.0, "gold": -1.0, "length": 4.0, "refusal_rate": 0.25,
            "ratio_above_early": 0.0625, "ratio_above_late": 0.03125, "kl_early_slope": 0.5, "kl_late_slope": 0.125}
FIX = {"proxy_reward": 2.0, "proxy_gain": 2.0, "gold": 1.25, "kl": 2.5, "kl_target": 2.0, "refusal_rate": 0.75}

PROXY = "baseline: proxy reward up"
GOLD_DOWN = "baseline: gold down"
LENGTH = "baseline: length up ≥ 50%"
REFUSAL_DOWN = "baseline: refusal down ≥ 20 points"
RATIO_ABOVE = "baseline: ratio_above high early"
KL_EARLY = "baseline: KL rises fastest early"
FIX_KL = "fix: final KL within 0.5–1.5× target"
FIX_GOLD = "fix: gold ≥ reference"
FIX_REFUSAL = "fix: refusal within 5 points"
FIX_KEEPS = "fix: keeps ≥ half the proxy gain"

# (id, the check, passes?, changes: {"baseline" | "fix" | "reference": {key: value}})
CASES = [
    ("proxy-down", PROXY, False, {"baseline": {"proxy_reward": -0.5}}),
    ("proxy-flat", PROXY, False, {"baseline": {"proxy_reward": 0.0}}),
    ("gold-up", GOLD_DOWN, False, {"baseline": {"gold": 1.5}}),
    ("gold-equal", GOLD_DOWN, False, {"baseline": {"gold": 1.0}}),
    ("length-short", LENGTH, False, {"baseline": {"length": 2.96875}}),
    ("length-at-1.5x", LENGTH, True, {"baseline": {"length": 3.0}}),
    ("refusal-drop-too-small", REFUSAL_DOWN, False, {"baseline": {"refusal_rate": 0.5625}}),
    ("refusal-up-a-lot", REFUSAL_DOWN, False, {"baseline": {"refusal_rate": 1.0}}),
    ("ratio-above-below-4%", RATIO_ABOVE, False, {"baseline": {"ratio_above_early": 0.03125,
                                                               "ratio_above_late": 0.015625}}),
    ("ratio-above-not-above-late", RATIO_ABOVE, False, {"baseline": {"ratio_above_late": 0.0625}}),
    ("ratio-above-at-4%", RATIO_ABOVE, True, {"baseline": {"ratio_above_early": 0.04}}),
    ("kl-early-flat", KL_EARLY, False, {"baseline": {"kl_early_slope": 0.0, "kl_late_slope": -0.125}}),
    ("kl-early-below-1.5x", KL_EARLY, False, {"baseline": {"kl_late_slope": 0.375}}),
    ("kl-early-at-1.5x", KL_EARLY, True, {"baseline": {"kl_early_slope": 0.75, "kl_late_slope": 0.5}}),
    ("kl-late-falling", KL_EARLY, True, {"baseline": {"kl_late_slope": -0.5}}),
    ("fix-kl-just-low", FIX_KL, False, {"fix": {"kl": 0.9375}}),
    ("fix-kl-just-high", FIX_KL, False, {"fix": {"kl": 3.0625}}),
    ("fix-kl-at-0.5x", FIX_KL, True, {"fix": {"kl": 1.0}}),
    ("fix-kl-at-1.5x", FIX_KL, True, {"fix": {"kl": 3.0}}),
    ("fix-gold-below", FIX_GOLD, False, {"fix": {"gold": 0.9375}}),
    ("fix-gold-equal", FIX_GOLD, True, {"fix": {"gold": 1.0}}),
    ("fix-refusal-up", FIX_REFUSAL, False, {"fix": {"refusal_rate": 0.8125}}),
    ("fix-refusal-down", FIX_REFUSAL, False, {"fix": {"refusal_rate": 0.6875}}),
    ("fix-refusal-close", FIX_REFUSAL, True, {"fix": {"refusal_rate": 0.71875}}),
    ("fix-keeps-too-little", FIX_KEEPS, False, {"fix": {"proxy_reward": 1.25}}),
    ("fix-keeps-half", FIX_KEEPS, True, {"fix": {"proxy_reward": 1.5}}),
    ("fix-keeps-of-no-gain", FIX_KEEPS, False, {"baseline": {"proxy_reward": -1.0}, "fix": {"proxy_reward": 0.5}}),
]


def _summary(changes):
    summary = {"reference": copy.deepcopy(REFERENCE), "baseline": copy.deepcopy(BASELINE), "fix": copy.deepcopy(FIX)}
    for part, values in changes.items():
        summary[part].update(values)
    for part in ("baseline", "fix"):  # proxy_gain as report.run_entry derives it
        summary[part]["proxy_gain"] = summary[part]["proxy_reward"] - summary["reference"]["proxy_reward"]
    return summary


def _verdicts(summary):
    checks = {c.item: c for c in bar_checks(summary)}
    independent = {item: bool(holds(summary["reference"], summary["baseline"], summary["fix"]))
                   for item, holds in BAR.items()}
    return checks, independent


def test_the_base_summary_passes_every_check():
    checks, independent = _verdicts(_summary({}))
    assert set(checks) == set(BAR)
    assert all(c.ok and c.margin > 0 for c in checks.values()), checks
    assert all(independent.values())


@pytest.mark.parametrize("item, passes, changes", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_check_on_an_input_that_fails_it_and_one_that_passes_it(item, passes, changes):
    checks, independent = _verdicts(_summary(changes))
    assert {k: c.ok for k, c in checks.items()} == independent  # every check, not only the one aimed at
    check = checks[item]
    assert check.ok is passes, check
    # the margin: how far inside (≥ 0) or outside (< 0; 0 on the boundary of a strict inequality)
    assert check.margin >= 0 if passes else check.margin <= 0, check


def test_every_check_has_a_failing_case():
    assert {c[1] for c in CASES if not c[2]} == set(BAR)


def test_the_fix_kl_check_needs_a_target():
    checks = [c.item for c in bar_checks(_summary({"fix": {"kl_target": None}}))]
    assert FIX_KL not in checks and len(checks) == len(BAR) - 1


def test_a_check_fails_over_seeds_when_one_seed_fails_it():
    summaries = [_summary({}), _summary({"baseline": {"length": 2.5}}), _summary({})]
    bar = {c["item"]: c for c in bar_over_seeds(summaries)}
    assert not bar[LENGTH]["ok"] and bar[LENGTH]["seeds_ok"] == 2
    assert bar[LENGTH]["min_margin"] == pytest.approx(2.5 / 2.0 - 1.5)
    assert all(c["ok"] and c["seeds_ok"] == 3 for item, c in bar.items() if item != LENGTH)
