"""The case study's plots: per-step curves (mean over seeds with the min–max band), gold /
proxy against √KL (Gao et al. 2022) and every seed's value of each check of the bar against
its bound. matplotlib is imported only when plotting."""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Sequence

from .metrics import mean_over_seeds
from .pipeline import CaseStudyResult, MultiSeedResult, RunResult, smoothed

STEP_PLOTS = {
    # file: (per-step metric, axis label)
    "proxy_reward.png": ("score_norm_mean", "proxy reward (RM score, reference std units)"),
    "gold.png": ("gold", "gold score"),
    "kl.png": ("kl_ref_k1_sum", "KL to reference (nats per reply)"),
    "length.png": ("length", "mean reply length (tokens)"),
    "refusal_rate.png": ("refusal_rate", "refusal rate on UNSAFE prompts"),
    "ratio_above.png": ("ratio_above", "fraction of tokens with ratio > 1 + ε (before clipping)"),
    "first_refuse_unsafe.png": ("first_refuse_unsafe", "π(REFUSE first) on UNSAFE prompts (exact)"),
    "first_kl_unsafe.png": ("first_kl_unsafe", "first-token KL to reference on UNSAFE prompts (nats)"),
}
BAR_PLOT = "bar_per_seed.png"
PLOTS = tuple(STEP_PLOTS) + ("gold_proxy_vs_sqrt_kl.png", BAR_PLOT)


def _curves(results: Sequence[CaseStudyResult], pick: Callable[[CaseStudyResult], RunResult], key: str):
    """Steps, mean, min and max over the seeds of one per-step metric (steps where every seed has it)."""
    per_seed = []
    for result in results:
        per_seed.append({r["step"]: r[key] for r in pick(result).records if key in r})
    steps = sorted(set.intersection(*[set(d) for d in per_seed])) if per_seed else []
    window = 5
    series = [smoothed([d[s] for s in steps], window) for d in per_seed]
    columns = list(zip(*series)) if series else []
    return steps, [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot_all(multi: MultiSeedResult, out_dir: str) -> List[str]:
    """Write :data:`PLOTS` into ``out_dir`` (mean over seeds, min–max band); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = multi.results
    n = len(results)
    runs = [("baseline", lambda r: r.baseline, "tab:red"), ("fix", lambda r: r.fixed, "tab:green")]
    ref_mean = lambda key: mean_over_seeds([r.reference.summary[key] for r in results])  # noqa: E731
    ref_values = {"score_norm_mean": ref_mean("proxy_reward"), "gold": ref_mean("gold"), "kl_ref_k1_sum": 0.0,
                  "length": ref_mean("length"), "refusal_rate": ref_mean("refusal_rate")}
    band = f"mean of {n} seeds, band min–max" if n > 1 else f"seed {multi.seeds[0]}"
    written = []
    for filename, (key, label) in STEP_PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, pick, color in runs:
            steps, mean, low, high = _curves(results, pick, key)
            if not steps:
                continue
            if n > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
            ax.plot(steps, mean, color=color, label=name)
        if key in ref_values:
            ax.axhline(ref_values[key], color="gray", linestyle="--", linewidth=1, label="reference")
        target = results[0].fixed.summary.get("kl_target")
        if key == "kl_ref_k1_sum" and target:
            ax.axhline(target, color="tab:green", linestyle=":", label="fix KL target")
        ax.set_xlabel("PPO step")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(band, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(fig)
        written.append(filename)

    # gold and proxy against √KL (Gao et al. 2022): trajectories and end points of every seed
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, final_key, label in (
        (axes[0], "gold", "gold", "gold score"),
        (axes[1], "score_norm_mean", "proxy_reward", "proxy reward (RM std units)"),
    ):
        for name, pick, color in runs:
            for i, result in enumerate(results):
                run = pick(result)
                kl = smoothed([max(r["kl_ref_k1_sum"], 0.0) for r in run.records], 5)
                values = smoothed([r[key] for r in run.records], 5)
                ax.plot([math.sqrt(k) for k in kl], values, color=color, alpha=0.35, linewidth=0.8,
                        label=f"{name} (steps)" if i == 0 else None)
                ax.scatter([math.sqrt(max(run.summary["kl"], 0.0))], [run.summary[final_key]], color=color,
                           zorder=3, s=14)
        if results[0].sweep:
            points = []
            for j in range(len(results[0].sweep)):
                runs_j = [r.sweep[j].summary for r in results]
                points.append((math.sqrt(max(mean_over_seeds([s["kl"] for s in runs_j]), 0.0)),
                               mean_over_seeds([s[final_key] for s in runs_j])))
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:blue",
                    label="sweep over KL targets (mean of seeds)")
        ax.scatter([0.0], [ref_mean(final_key)], color="gray", marker="s", zorder=3, label="reference")
        ax.set_xlabel("√KL to reference (√nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = ", ".join(str(s) for s in multi.seeds)
    fig.suptitle(f"seed{'s' if n > 1 else ''} {seeds}: per-step trajectories (smoothed) and final evaluations (dots)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gold_proxy_vs_sqrt_kl.png"), dpi=110)
    plt.close(fig)
    written.append("gold_proxy_vs_sqrt_kl.png")
    return written


def plot_bar(summary: Dict, out_dir: str) -> str:
    """:data:`BAR_PLOT`: one panel per check of the bar, each seed's value (a dot, red when it
    fails) against the values that pass (white; the rest shaded), from ``summary["bar"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, checks = summary["seeds"], summary["bar"]
    cols = 5
    rows = -(-len(checks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), squeeze=False)
    x = list(range(len(seeds)))
    for ax, check in zip(axes.flat, checks):
        scale = 100.0 if "refusal" in check["item"] or "ratio_above" in check["item"] else 1.0
        values = [v * scale if v is not None and math.isfinite(v) else math.nan for v in check["values"]]
        intervals = [(-math.inf if lo is None else lo * scale, math.inf if hi is None else hi * scale)
                     for lo, hi in check["intervals"]]
        finite = [v for v in values if v == v]
        ends = [e for lo_hi in intervals for e in lo_hi if math.isfinite(e)]
        low, high = min(finite + ends), max(finite + ends)
        pad = 0.15 * (high - low or 1.0)
        ymin, ymax = low - pad, high + pad
        for i, (lo, hi) in enumerate(intervals):  # shade what fails, seed by seed
            if lo > ymin:
                ax.fill_between([i - 0.5, i + 0.5], ymin, lo, color="tab:red", alpha=0.12, linewidth=0)
            if hi < ymax:
                ax.fill_between([i - 0.5, i + 0.5], hi, ymax, color="tab:red", alpha=0.12, linewidth=0)
        ok = [lo <= v <= hi for v, (lo, hi) in zip(values, intervals)]
        ax.scatter(x, values, c=["tab:green" if good else "tab:red" for good in ok], s=18, zorder=3)
        ax.set_ylim(ymin, ymax)
        ax.set_xlim(-0.5, len(seeds) - 0.5)
        ax.set_xticks(x)
        ax.set_xticklabels([str(s) for s in seeds], fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        unit = " (%)" if scale == 100.0 else ""
        ax.set_title(f"{check['item']}{unit}\nbound {check['bound']}", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(checks):]:
        ax.axis("off")
    fig.supxlabel("seed", fontsize=8)
    verdict = "holds on every seed" if summary["passed"] else "FAILS on some seed"
    fig.suptitle(f"the bar, seed by seed (shaded: values that fail): {verdict}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, BAR_PLOT), dpi=110)
    plt.close(fig)
    return BAR_PLOT
