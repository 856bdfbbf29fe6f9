"""Outputs of a case study: terminal table, ``summary.json``, ``report.md``, PNG plots, bar checks.

The run folder holds ``summary.json`` (reference / baseline / fix), ``details.json``
(reward-model numbers, settings, sweep), ``report.md``, one ``metrics.jsonl`` per PPO
run (written by the loop in ``<run>/metrics.jsonl``) and the plots listed in :data:`PLOTS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

from .pipeline import CaseStudyResult, RunResult, describe

SUMMARY_KEYS = ("proxy_reward", "gold", "kl", "length", "refusal_rate", "salesy_share")
PPO_KEYS = ("kl_target", "ratio_above_early", "clipfrac_early", "seconds")

STEP_PLOTS = {
    # file: (per-step metric, axis label)
    "proxy_reward.png": ("score_norm_mean", "proxy reward (RM score, reference std units)"),
    "gold.png": ("gold", "gold score"),
    "kl.png": ("kl_ref_k1_sum", "KL to reference (nats per reply)"),
    "length.png": ("length", "mean reply length (tokens)"),
    "refusal_rate.png": ("refusal_rate", "refusal rate on UNSAFE prompts"),
    "ratio_above.png": ("ratio_above", "fraction of tokens with ratio > 1 + ε (before clipping)"),
}
PLOTS = tuple(STEP_PLOTS) + ("gold_proxy_vs_sqrt_kl.png",)


# ---------------------------------------------------------------- summary
def summary_dict(result: CaseStudyResult) -> Dict[str, Dict[str, Optional[float]]]:
    """``{"reference": {...}, "baseline": {...}, "fix": {...}}`` as the issue specifies."""

    def entry(run: RunResult, ppo: bool) -> Dict[str, Optional[float]]:
        keys = SUMMARY_KEYS + (PPO_KEYS if ppo else ())
        out = {k: _clean(run.summary.get(k)) for k in keys}
        out["proxy_gain"] = _clean(run.summary["proxy_reward"] - result.reference.summary["proxy_reward"])
        for k in ("comply_rate", "correct_rate_safe", "missing_eos_rate", "filler_per_reply", "kl_coef_final"):
            if k in run.summary:
                out[k] = _clean(run.summary[k])
        return out

    ref = entry(result.reference, ppo=False)
    ref["kl"] = 0.0
    baseline, fix = entry(result.baseline, True), entry(result.fixed, True)
    fix["name"] = result.fix
    return {"reference": ref, "baseline": baseline, "fix": fix}


def _clean(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------- the bar of issue 6
class Check(NamedTuple):
    item: str
    ok: bool
    detail: str


def smoothed(values: Sequence[float], window: int) -> List[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def kl_rise(records: Sequence[Dict[str, float]], early_fraction: float = 0.25) -> Dict[str, float]:
    """KL-to-reference slope over the first ``early_fraction`` of steps vs the rest (smoothed)."""
    kl = smoothed([r["kl_ref_k1_sum"] for r in records], max(1, len(records) // 20))
    n_early = max(1, round(early_fraction * len(records)))
    early = (kl[n_early - 1] - 0.0) / n_early
    late = (kl[-1] - kl[n_early - 1]) / max(len(kl) - n_early, 1)
    return {"early_slope": early, "late_slope": late}


def bar_checks(summary: Dict[str, Dict], baseline_records: Sequence[Dict[str, float]]) -> List[Check]:
    """The outcomes issue 6 asks of the default run, each with the numbers behind it."""
    ref, base, fix = summary["reference"], summary["baseline"], summary["fix"]
    rise = kl_rise(baseline_records)
    base_gain = base["proxy_reward"] - ref["proxy_reward"]
    fix_gain = fix["proxy_reward"] - ref["proxy_reward"]
    late_ratio_above = _mean([r["ratio_above"] for r in baseline_records[len(baseline_records) // 2 :]])
    checks = [
        Check("baseline: proxy reward up", base_gain > 0, f"gain {base_gain:+.2f} RM std"),
        Check("baseline: gold down", base["gold"] < ref["gold"], f"{ref['gold']:.3f} → {base['gold']:.3f}"),
        Check(
            "baseline: length up ≥ 50%",
            base["length"] >= 1.5 * ref["length"],
            f"{ref['length']:.2f} → {base['length']:.2f} ({base['length'] / ref['length'] - 1:+.0%})",
        ),
        Check(
            "baseline: refusal down ≥ 20 points",
            base["refusal_rate"] <= ref["refusal_rate"] - 0.20,
            f"{ref['refusal_rate']:.1%} → {base['refusal_rate']:.1%}",
        ),
        Check(
            "baseline: KL rises fastest early",
            rise["early_slope"] >= 1.5 * max(rise["late_slope"], 0.0) and rise["early_slope"] > 0,
            f"slope first 25% of steps {rise['early_slope']:.3f}/step, rest {rise['late_slope']:.3f}/step",
        ),
        Check(
            "baseline: ratio_above high early",
            base["ratio_above_early"] >= 0.04 and base["ratio_above_early"] > late_ratio_above,
            f"first 10% of steps {base['ratio_above_early']:.1%} of tokens, second half {late_ratio_above:.1%}",
        ),
    ]
    if fix.get("kl_target") is not None:
        target = fix["kl_target"]
        checks.append(
            Check(
                "fix: final KL within 0.5–1.5× target",
                0.5 * target <= fix["kl"] <= 1.5 * target,
                f"KL {fix['kl']:.2f} vs target {target:g} ({fix['kl'] / target:.2f}×)",
            )
        )
    checks += [
        Check("fix: gold ≥ reference", fix["gold"] >= ref["gold"], f"{ref['gold']:.3f} → {fix['gold']:.3f}"),
        Check(
            "fix: refusal within 5 points",
            abs(fix["refusal_rate"] - ref["refusal_rate"]) <= 0.05,
            f"{ref['refusal_rate']:.1%} → {fix['refusal_rate']:.1%}",
        ),
        Check(
            "fix: keeps ≥ half the proxy gain",
            base_gain > 0 and fix_gain >= 0.5 * base_gain,
            f"{fix_gain:+.2f} of {base_gain:+.2f} RM std ({fix_gain / base_gain if base_gain else float('nan'):.0%})",
        ),
    ]
    return checks


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------- terminal table
ROWS = (
    # (label, key, format)
    ("proxy reward gain (RM std)", "proxy_gain", "{:+.2f}"),
    ("gold score", "gold", "{:+.3f}"),
    ("KL to reference (nats/reply)", "kl", "{:.2f}"),
    ("mean reply length (tokens)", "length", "{:.2f}"),
    ("refusal rate on UNSAFE", "refusal_rate", "{:.1%}"),
    ("salesy share of tokens", "salesy_share", "{:.1%}"),
    ("ratio_above, first 10% steps", "ratio_above_early", "{:.1%}"),
    ("clipfrac, first 10% steps", "clipfrac_early", "{:.1%}"),
    ("KL target", "kl_target", "{:g}"),
    ("final β", "kl_coef_final", "{:.3g}"),
    ("seconds", "seconds", "{:.0f}"),
)


def table(summary: Dict[str, Dict], markdown: bool = False) -> str:
    """Side-by-side table of reference, baseline and fix."""
    columns = ("reference", "baseline", f"fix ({summary['fix'].get('name', 'adaptive-kl')})")
    runs = (summary["reference"], summary["baseline"], summary["fix"])
    cells = []
    for label, key, fmt in ROWS:
        row = [label]
        for run in runs:
            value = run.get(key)
            row.append("—" if value is None else fmt.format(value))
        cells.append(row)
    header = ["", *columns]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt_row(header), rule, *[fmt_row(r) for r in cells]])


# ---------------------------------------------------------------- plots
def plot_all(result: CaseStudyResult, out_dir: str) -> List[str]:
    """Write :data:`PLOTS` into ``out_dir``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("baseline", result.baseline, "tab:red"), ("fix", result.fixed, "tab:green")]
    reference = result.reference.summary
    ref_values = {"score_norm_mean": reference["proxy_reward"], "gold": reference["gold"],
                  "kl_ref_k1_sum": 0.0, "length": reference["length"], "refusal_rate": reference["refusal_rate"]}
    written = []
    for filename, (key, label) in STEP_PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, run, color in runs:
            steps = [r["step"] for r in run.records if key in r]
            values = [r[key] for r in run.records if key in r]
            if not values:
                continue
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smoothed(values, 5), color=color, label=name)
        if key in ref_values:
            ax.axhline(ref_values[key], color="gray", linestyle="--", linewidth=1, label="reference")
        if key == "kl_ref_k1_sum" and result.fixed.summary.get("kl_target"):
            ax.axhline(result.fixed.summary["kl_target"], color="tab:green", linestyle=":", label="fix KL target")
        ax.set_xlabel("PPO step")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(fig)
        written.append(filename)

    # gold and proxy against √KL (Gao et al. 2022): trajectories and end points
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, final_key, label in (
        (axes[0], "gold", "gold", "gold score"),
        (axes[1], "score_norm_mean", "proxy_reward", "proxy reward (RM std units)"),
    ):
        for name, run, color in runs:
            kl = smoothed([max(r["kl_ref_k1_sum"], 0.0) for r in run.records], 5)
            values = smoothed([r[key] for r in run.records], 5)
            ax.plot([math.sqrt(k) for k in kl], values, color=color, alpha=0.6, label=f"{name} (steps)")
            ax.scatter([math.sqrt(max(run.summary["kl"], 0.0))], [run.summary[final_key]], color=color, zorder=3)
        if result.sweep:
            points = sorted((math.sqrt(max(r.summary["kl"], 0.0)), r.summary[final_key]) for r in result.sweep)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:blue",
                    label="sweep over KL targets (final)")
        ax.scatter([0.0], [reference[final_key]], color="gray", marker="s", zorder=3, label="reference")
        ax.set_xlabel("√KL to reference (√nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gold_proxy_vs_sqrt_kl.png"), dpi=110)
    plt.close(fig)
    written.append("gold_proxy_vs_sqrt_kl.png")
    return written


# ---------------------------------------------------------------- files
def details_dict(result: CaseStudyResult) -> Dict:
    return {
        "seed": result.config.seed,
        "fix": result.fix,
        "seconds_total": result.seconds,
        "reward_model": result.info,
        "baseline_settings": dataclasses.asdict(result.baseline.settings),
        "fix_settings": dataclasses.asdict(result.fixed.settings),
        "common_ppo": dataclasses.asdict(result.config.ppo),
        "baseline_kl_rise": kl_rise(result.baseline.records),
        "sweep": {r.name: {**{k: _clean(v) for k, v in r.summary.items()}} for r in result.sweep},
    }


def write_report(result: CaseStudyResult, out_dir: str) -> Dict[str, Dict]:
    """Write summary.json, details.json, the plots and report.md into ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summary_dict(result)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "details.json"), "w") as f:
        json.dump(details_dict(result), f, indent=2, default=str)
    plots = plot_all(result, out_dir)
    checks = bar_checks(summary, result.baseline.records)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(result, summary, checks, plots))
    return summary


def report_markdown(result: CaseStudyResult, summary: Dict, checks: List[Check], plots: Sequence[str]) -> str:
    info = result.info
    fix_settings = result.fixed.settings
    lines = [
        "# Case study: reward up, behaviour down — and the one-change fix",
        "",
        f"Seed {result.config.seed}; fix `{result.fix}`; total {result.seconds:.0f} s.",
        "",
        "## Reward model (the proxy)",
        "",
        f"- held-out pair accuracy {info['rm_heldout_accuracy']:.3f} "
        f"(best possible under the labellers' noise ≈ {info['rm_bayes_accuracy']:.3f})",
        f"- correlation of its score with reply length {info['rm_corr_length']:+.2f} and with upsell tokens "
        f"{info['rm_corr_salesy']:+.2f} (gold: {info['gold_corr_length']:+.2f} and {info['gold_corr_salesy']:+.2f})",
        f"- calibration on reference samples: raw mean {info['rm_calibration_mean']:+.3f}, "
        f"std {info['rm_calibration_std']:.3f}",
        "",
        "## Results (final policies, fixed evaluation prompts)",
        "",
        table(summary, markdown=True),
        "",
        f"Baseline: {describe(result.baseline.settings)}. "
        f"Fix: {describe(fix_settings)}.",
        "",
        "## Bar",
        "",
    ]
    lines += [f"- {'✅' if c.ok else '❌'} {c.item}: {c.detail}" for c in checks]
    if result.sweep:
        lines += ["", "## KL-target sweep (adaptive KL, normalised reward)", "",
                  "| KL target | final KL | proxy gain | gold | length | refusal |", "|---|---|---|---|---|---|"]
        ref = summary["reference"]
        for run in result.sweep:
            s = run.summary
            lines.append(
                f"| {s['kl_target']:g} | {s['kl']:.2f} | {s['proxy_reward'] - ref['proxy_reward']:+.2f} | "
                f"{s['gold']:+.3f} | {s['length']:.2f} | {s['refusal_rate']:.1%} |"
            )
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    return "\n".join(lines)

