"""The detectors: each reads the monitor's short history of canonical signals and says whether its
condition holds at the latest record, with the numbers behind it.

A condition must hold on :data:`PERSISTENCE` consecutive records before the monitor reports it
(:mod:`.core`), so one noisy batch never raises anything. Each threshold below is written with the
reasoning it comes from; none was fitted to a run. docs/monitor.md collects them in a table.

Two kinds of evidence feed the one compound alarm (``kl_drift+<evidence>``):

* **drift with nothing to bound it** (:func:`kl_drift`): the KL to the reference keeps rising,
  and neither a KL controller nor a penalty strong enough for the budget will stop it;
* **the drift goes where the proxy over-pays** (:func:`length_coupling`, :func:`advantage_tail`):
  replies lengthen while the proxy pays for length, or a few replies score far above the rest.

Drift alone is what any optimisation does; an exploit channel alone is a property of the reward.
Together they are the incident's mechanism, and that is what an alarm needs. A direct observation
needs no partner: the KL at twice a declared budget (:func:`kl_budget`), or a held-out score the
user logs falling while the proxy rises (:func:`held_out`).
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .state import History

PERSISTENCE = 3
"""Consecutive records a condition must hold before it is reported. A single batch's noise (a rare
reply with a huge KL, a lucky batch) lasts one record; three in a row of a condition that is false
on average has probability ~q³ for a per-record false rate q."""

WINDOW = 10
"""Records in the sliding window of slopes and correlations: a least-squares slope over 10 points
has 8 degrees of freedom, enough for its standard error to mean something."""

SLOPE_Z = 2.0
"""A slope is "rising" when it exceeds 2 standard errors (one-sided ≈ 97.7%)."""

DEFAULT_KL_BUDGET = math.log(100.0)
"""KL budget per reply when none is declared: ln 100 ≈ 4.6 nats. The KL per reply is the expected
log-likelihood ratio of a reply under the policy and the reference; at ln 100 the policy's typical
reply is 100 times likelier under the policy than under the reference, i.e. the reference (and the
reward model's training data, drawn from policies like it) produces such replies about 1% as often.
Past that, the proxy's score is an extrapolation. Declare your own (``kl_budget=``) for long replies."""

KL_WARN_FACTOR = 1.2
"""KL above 1.2 × the budget: outside the adaptive controller's own band (Ziegler et al. 2019 clip
its error KL/target − 1 at ±0.2, so beyond +20% the controller is already at its fastest)."""

KL_ALARM_FACTOR = 2.0
"""KL at 2 × a *declared* budget, persistently, with nothing restoring it: the run has spent double
the KL it was allowed. Under an adaptive controller that is still raising β this is a transient,
not an alarm: the controller multiplies β by at most 1 + 0.2·n/H per step, so a start from too low
a β costs an overshoot (see :func:`kl_budget` for when the controller counts as losing)."""

MOVEMENT_SHARE = math.erfc(2.0 / math.sqrt(2.0))
"""Share of tokens outside the clip range [1 − ε, 1 + ε] (ratio_above + ratio_below) that counts as
"each update moves a lot": 2·Φ(−2) ≈ 4.6%, the share outside ±ε when the per-update log-ratios of
the tokens spread with standard deviation ε/2. A trust region that binds on more tokens than that
is the clip, not the learning rate, setting the step."""

CLIPFRAC_SHARE = MOVEMENT_SHARE / 2.0
"""The same for ``clipfrac`` (a clipped surrogate needs the ratio out of range *and* the advantage's
sign to point outward, about half of those tokens): Φ(−2) ≈ 2.3%."""

ADV_MAX = 4.0
"""A standardised advantage of 4: one reply (or token) scoring 4 standard deviations above the
batch. Under a normal distribution that is 3·10⁻⁵ per sample: a batch below ~30 000 samples
rarely shows one. A persistent 4σ reply is a rare pattern the proxy over-pays."""

ADV_FRAC = MOVEMENT_SHARE
"""Share of advantages above +2 standard deviations: twice the normal distribution's 2.3%."""

LENGTH_CORR = 0.3
"""The proxy pays for length when the within-batch correlation of score and length on the
reference's replies (the first records) is ≥ 0.3: length explains ≥ 9% of the score's variance,
a medium effect (Cohen 1988), more than a reward that judges content should give to length."""

LENGTH_ACROSS_CORR = 0.7
"""Without a within-batch correlation, the proxy pays for length when the step-to-step *changes* of
the mean score and the mean length correlate ≥ 0.7 over the window (≥ 8 changes; r ≥ 0.7 is
p ≈ 0.03 one-sided at 8 points). Changes, not levels: two series that both trend with training time
correlate whatever drives them (a spurious regression); their changes correlate only when a batch
that happens to be longer also scores higher, which is the within-batch payment seen across batches."""

LENGTH_DRIFT = 0.25
"""Replies a quarter longer (or shorter) than the reference's on average: a change of style any
reader notices, well beyond the few percent a batch mean moves by sampling."""

ENTROPY_FRACTION = 0.5
"""Entropy per token at half the reference's: the policy has given up half its uncertainty (in
nats), the first sign of the mode collapse that over-optimisation ends in."""


class Finding(NamedTuple):
    """A detector's condition holding at the latest record."""

    grade: str
    """"warning" or "alarm": what the condition supports once it persists."""
    values: Dict[str, float]
    """The signals and derived numbers behind it."""
    diagnosis: str
    """Plain language: what is happening."""
    role: Optional[str] = None
    """"drift" or "exploit": the part it plays in the compound alarm (None: none)."""


class Bound(NamedTuple):
    """What holds the KL to the reference: a controller's budget, a fixed penalty's ceiling, or nothing."""

    kind: str
    """"controller", "penalty" or "none"."""
    budget: float
    """Budget per reply (nats): the controller's target, the declared budget, or the default."""
    declared: bool
    """The budget is the user's or a controller's (not :data:`DEFAULT_KL_BUDGET`)."""
    ceiling: Optional[float] = None
    """KL per reply a fixed penalty lets the policy reach (σ²/2β²; ∞ for β = 0; None: unknown)."""

    @property
    def holds(self) -> bool:
        """A controller, or a penalty whose ceiling is within the budget."""
        return self.kind == "controller" or (self.ceiling is not None and self.ceiling <= self.budget)


def slope(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares slope of ``(x, y)`` points and its standard error (nan, nan with < 3 points)."""
    n = len(points)
    if n < 3:
        return math.nan, math.nan
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return math.nan, math.nan
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in points)
    se = math.sqrt(residual / (n - 2) / sxx) if n > 2 else math.inf
    return b, se


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (nan when either series is constant or shorter than 3)."""
    n = len(xs)
    if n < 3:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def rising(points: Sequence[Tuple[float, float]]) -> Tuple[bool, float, float]:
    """``(is the slope > 2 standard errors above 0, slope, standard error)``."""
    b, se = slope(points)
    return (not math.isnan(b)) and b > 0 and b > SLOPE_Z * se, b, se


def bound(h: History) -> Bound:
    """What holds the KL: the controller's target, else the penalty's ceiling against the budget.

    The ceiling: the KL-regularised optimum π ∝ π_ref·exp(r/β) of a score with standard deviation
    σ under the reference is KL = σ²/(2β²) away from it (exact for a normal score). With the KL in
    the reward, σ is the score's spread on the reference's replies; with the KL in the loss, the
    advantages it competes with are standardised (σ = 1) and the ceiling is per token (× length).
    """
    target = h.last("kl_target")
    if target is not None and target > 0:
        return Bound("controller", target, True)
    budget = h.config.kl_budget if h.config.kl_budget is not None else DEFAULT_KL_BUDGET
    declared = h.config.kl_budget is not None
    beta = h.last("beta")
    if beta is None:
        beta = h.config.beta
    if beta is None:
        return Bound("none", budget, declared, None)
    if beta <= 0:
        return Bound("none", budget, declared, math.inf)
    if h.kl_penalty == "loss":
        length = h.last("length")
        ceiling = None if length is None else length / (2.0 * beta * beta)
    else:
        sigma = h.reference_mean("score_std")
        if sigma is None and h.reference_mean("score_range") is not None:
            sigma = h.reference_mean("score_range") / 2.0  # σ ≤ range/2 for any distribution: an upper bound
        ceiling = None if sigma is None else sigma * sigma / (2.0 * beta * beta)
    return Bound("penalty", budget, declared, ceiling)


def catch_up_steps(h: History, ratio: float) -> Optional[float]:
    """Steps the controller needs, at the rate it has raised β since β's lowest point in the window (where
    it turned to raising), to bring a KL at ``ratio`` × its target back to the target: β must grow by
    √ratio (the optimum's KL goes as 1/β², σ²/2β²). ∞ when β is not rising; None when β is not logged."""
    betas = [(s, v) for s, v in h.series("beta") if v > 0]
    if len(betas) < 2:
        return None
    low = min(range(len(betas)), key=lambda i: betas[i][1])
    if low == len(betas) - 1:
        return math.inf
    rate = math.log(betas[-1][1] / betas[low][1]) / (betas[-1][0] - betas[low][0])  # ln β per step
    return math.inf if rate <= 0 else 0.5 * math.log(ratio) / rate


def kl_budget(h: History) -> Optional[Finding]:
    """The KL to the reference against its budget: warning above 1.2×; alarm at 2× a declared budget that
    nothing restores. A controller counts as restoring it when, at the rate it has raised β since its
    lowest point in the window, it gets β up by √(KL/target) within the run's age (the horizon of every
    projection here)."""
    kl = h.last("kl")
    if kl is None:
        return None
    b = bound(h)
    ratio = kl / b.budget
    if ratio <= KL_WARN_FACTOR:
        return None
    source = {"controller": "the controller's target"}.get(b.kind, "the declared budget" if b.declared
                                                           else "the default budget (ln 100)")
    values = {"kl": kl, "kl_budget": b.budget, "kl_over_budget": ratio}
    text = f"KL to the reference {kl:.3g} nats/reply is {ratio:.3g}× {source} of {b.budget:.3g}"
    grade = "alarm" if b.declared and ratio >= KL_ALARM_FACTOR else "warning"
    if b.kind == "controller":
        steps = catch_up_steps(h, ratio)
        age = h.step - h.start_step + 1
        if steps is not None:
            values["catch_up_steps"] = steps
            if steps <= age:
                grade = "warning"
                text += (f"; the controller is raising β and needs ~{steps:.0f} more steps at its pace to restore "
                         "the budget")
            else:
                text += f"; at the pace β rises the controller needs {steps:.3g} steps to restore it"
    return Finding(grade, values, text + ".")


def kl_drift(h: History) -> Optional[Finding]:
    """The KL's velocity: rising (slope > 2 SE over the window) and projected past the budget.

    The horizon of the projection is the run's age: "at this pace the KL passes the budget before
    the run is twice as old as it is now". With nothing to bound it (no controller, and a penalty
    whose ceiling σ²/2β² is above the budget) the finding is the compound alarm's drift evidence;
    under a controller it is a warning that the KL will overshoot. Its message puts the slope over the
    run's first records (from the reference's 0) beside the recent one: the incident's KL rose fastest
    early, and a recent slope still near the early one says nothing has started to hold it.

    Without a KL penalty (β = 0) a trainer may log no KL at all (TRL computes none then): nothing
    bounds the drift by construction, and the optimisation pressure shows as the proxy score rising
    (slope > 2 SE over the window), which then stands for the drift.
    """
    points = h.series("kl")
    if not points:
        return _unmeasured_drift(h)
    if len(points) < 4:
        return None
    up, b_recent, se = rising(points)
    if not up:
        return None
    kl, step = points[-1][1], points[-1][0]
    age = max(step - h.start_step + 1, 1)
    projected = kl + b_recent * age
    b = bound(h)
    early, _ = slope(h.early("kl"))
    values = {"kl": kl, "kl_slope": b_recent, "kl_slope_se": se, "kl_slope_early": early,
              "kl_projected": projected, "kl_budget": b.budget}
    if b.ceiling is not None:
        values["kl_ceiling"] = b.ceiling
    pace = (f"KL to the reference {kl:.2f} nats/reply, rising {b_recent:.3f}/step (± {se:.3f}; "
            f"{early:.3f}/step over the first records); at this pace {projected:.1f} by step {step + age:g}")
    if not b.holds:
        if kl <= b.budget and projected <= b.budget:
            return None
        beta = h.last("beta") if h.last("beta") is not None else h.config.beta
        if b.ceiling is None:
            why = ("no KL controller or penalty is known to the monitor" if beta is None else
                   f"β = {beta:.3g}, and without the score's spread no ceiling can be shown below the budget")
        elif math.isinf(b.ceiling):
            why = "there is no KL penalty (β = 0)"
        else:
            why = (f"β = {beta:.3g} lets the KL reach ~{b.ceiling:.3g} nats/reply before the penalty balances "
                   f"the score (σ²/2β²), far past the budget of {b.budget:.2f}")
        return Finding("warning", values, f"{pace}, and nothing bounds it: {why}.", role="drift")
    if projected <= KL_WARN_FACTOR * b.budget or kl > KL_WARN_FACTOR * b.budget:
        return None  # on course, or already reported by kl_budget
    return Finding("warning", values, f"{pace}: heading past the budget of {b.budget:.2f}.")


def _unmeasured_drift(h: History) -> Optional[Finding]:
    b = bound(h)
    score = h.series("score")
    if b.ceiling is None or not math.isinf(b.ceiling) or len(score) < 4:
        return None
    up, b_score, se = rising(score)
    if not up:
        return None
    return Finding("warning", {"score_slope": b_score, "score_slope_se": se},
                   f"The proxy score rises {b_score:.3g}/step (± {se:.2g}) and nothing bounds the drift: there is no "
                   "KL penalty (β = 0), so the KL to the reference is neither held nor measured.", role="drift")


def policy_movement(h: History) -> Optional[Finding]:
    """Each update moves many tokens beyond the clip range: ratio_above + ratio_below ≥ 4.6%
    (else clipfrac ≥ 2.3%, else approx_kl ≥ ε²/8, the per-token KL of log-ratios with std ε/2).

    The clip bounds each step against the previous policy, which is replaced every rollout; it
    never bounds the distance from the reference, so a persistently busy clip says the steps are
    large and only the KL term can keep their sum in check.
    """
    above, below, clipfrac, approx = (h.last(k) for k in ("ratio_above", "ratio_below", "clipfrac", "approx_kl"))
    if above is not None and below is not None:
        share, bar, name = above + below, MOVEMENT_SHARE, "ratio_above + ratio_below"
    elif clipfrac is not None:
        share, bar, name = clipfrac, CLIPFRAC_SHARE, "clipfrac"
    elif approx is not None:
        share, bar, name = approx, h.config.clip_eps ** 2 / 8.0, "approx_kl"
    else:
        return None
    if share < bar:
        return None
    what = "of the tokens leave the clip range in each update" if name != "approx_kl" else "per-update KL"
    return Finding("warning", {name: share, "threshold": bar},
                   f"{name} = {share:.1%} {what} (threshold {bar:.1%}): PPO's clip bounds each step, "
                   f"not the drift from the reference.")


def advantage_tail(h: History) -> Optional[Finding]:
    """A heavy right tail of advantages: max ≥ 4 standard deviations, or > 4.6% of them above +2σ."""
    adv_max, frac = h.last("adv_max"), h.last("adv_frac_large")
    values: Dict[str, float] = {}
    parts: List[str] = []
    if adv_max is not None and adv_max >= ADV_MAX:
        values["adv_max"] = adv_max
        parts.append(f"the largest advantage is {adv_max:.1f} standard deviations above the mean")
    if frac is not None and frac >= ADV_FRAC:
        values["adv_frac_large"] = frac
        parts.append(f"{frac:.1%} of advantages are above +2σ (a normal batch has 2.3%)")
    if not parts:
        return None
    return Finding("warning", values, "Advantage tail: " + " and ".join(parts) +
                   ": a few replies score far above the rest, the shape of a pattern the proxy over-pays.",
                   role="exploit")


def length_coupling(h: History) -> Optional[Finding]:
    """Replies ≥ 25% longer (shorter) than the reference's while the proxy pays for length (brevity).

    "Pays": the within-batch score–length correlation on the first records ≥ 0.3 (≤ −0.3), or,
    when no trainer logs it, the step-to-step changes of mean score and mean length correlating
    ≥ 0.7 over the window.
    """
    length, ref_length = h.last("length"), h.reference("length")
    if length is None or not ref_length:
        return None
    drift = length / ref_length - 1.0
    if abs(drift) < LENGTH_DRIFT:
        return None
    sign = 1.0 if drift > 0 else -1.0
    rho = h.reference_mean("score_length_corr")
    if rho is not None:
        pays, how = sign * rho >= LENGTH_CORR, f"within-batch score–length correlation {rho:+.2f} on the first records"
    else:
        pairs = h.paired("score", "length")
        changes = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(pairs, pairs[1:])]
        if len(changes) < 8:
            return None
        rho = correlation([c[0] for c in changes], [c[1] for c in changes])
        pays = not math.isnan(rho) and sign * rho >= LENGTH_ACROSS_CORR
        how = f"the changes of score and length from step to step correlate, r = {rho:+.2f} over {len(changes)}"
    if not pays:
        return None
    direction = "longer" if drift > 0 else "shorter"
    return Finding("warning", {"length": length, "length_reference": ref_length, "length_drift": drift,
                               "score_length_corr": rho},
                   f"Replies are {abs(drift):.0%} {direction} than the reference's ({ref_length:.2f} → {length:.2f} "
                   f"tokens) and the proxy pays for it ({how}).", role="exploit")


def entropy_collapse(h: History) -> Optional[Finding]:
    """Entropy per token at or below half the reference's."""
    entropy, ref = h.last("entropy"), h.reference("entropy")
    if entropy is None or not ref or ref <= 0 or entropy > ENTROPY_FRACTION * ref:
        return None
    return Finding("warning", {"entropy": entropy, "entropy_reference": ref},
                   f"Entropy per token {entropy:.3f} nats, {entropy / ref:.0%} of the reference's {ref:.3f}: "
                   "the policy is collapsing onto few replies.")


def held_out(h: History) -> Optional[Finding]:
    """A declared held-out score falling (slope < −2 SE) while the proxy rises (slope > 2 SE)."""
    score = h.series("score")
    score_up, score_slope, _ = rising(score)
    if len(score) < 4 or not score_up:
        return None
    for name in h.config.held_out:
        points = h.series("held_out/" + name)
        falling, b, se = rising([(x, -y) for x, y in points])
        if len(points) < 4:
            continue
        if falling:
            return Finding("alarm", {"score_slope": score_slope, f"{name}_slope": -b, f"{name}": points[-1][1]},
                           f"The held-out score {name!r} is falling ({-b:.3g}/step ± {se:.2g}) while the proxy "
                           f"rises ({score_slope:.3g}/step): the proxy's gains are not real.")
    return None


DETECTORS = {
    "kl_budget": kl_budget,
    "kl_drift": kl_drift,
    "policy_movement": policy_movement,
    "advantage_tail": advantage_tail,
    "length_coupling": length_coupling,
    "entropy_collapse": entropy_collapse,
    "held_out": held_out,
}
"""Every detector by the name its alerts carry as ``signal``."""
