"""A run's monitor signals over the steps, with its warnings and alarms marked (matplotlib, imported here only)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .core import RewardHackingMonitor
from .detectors import bound
from .offline import Run
from .signals import ADAPTERS, canonical

PANELS = (
    # (title, [(signal, label)])
    ("KL to the reference (nats/reply)", [("kl", "KL")]),
    ("reply length (tokens)", [("length", "length")]),
    ("proxy score", [("score", "score")]),
    ("per-update movement", [("movement", "ratio outside the clip range"), ("clipfrac", "clipfrac")]),
    ("score–length correlation, advantage tail", [("score_length_corr", "within-batch corr"),
                                                  ("adv_frac_large", "share of A > 2σ")]),
    ("entropy (nats/token)", [("entropy", "entropy")]),
)


def signal_series(run: Run, held_out: Sequence[str] = ()) -> Dict[str, List[Tuple[float, float]]]:
    """Each canonical signal of the run's records as ``(step, value)`` (plus ``movement`` =
    ratio_above + ratio_below where both are logged)."""
    adapter = ADAPTERS[run.trainer] if run.trainer in ADAPTERS else None
    series: Dict[str, List[Tuple[float, float]]] = {}
    if adapter is None:
        return series
    for record in run.records:
        signals = canonical(record, adapter, held_out)
        if "ratio_above" in signals and "ratio_below" in signals:
            signals["movement"] = signals["ratio_above"] + signals["ratio_below"]
        for name, value in signals.items():
            series.setdefault(name, []).append((record["step"], value))
    return series


def plot_run(run: Run, monitor: RewardHackingMonitor, out: str, title: Optional[str] = None) -> None:
    """Six panels of the run's signals with its alerts as vertical lines (warnings dashed, alarms solid red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(12, 6.2))
    note = _row(list(grid.flat), run, monitor, None)
    fig.suptitle(f"{title or run.source}: {note} (alarms: red lines, warnings: orange dashes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_runs(runs: Sequence[Tuple[Run, RewardHackingMonitor, str]], out: str,
              extra: Optional[Tuple[str, str]] = None) -> None:
    """One row of :data:`PANELS` per ``(run, monitor, title)``, into ``out``. ``extra = (title, key)`` adds a
    panel of a record key the monitor does not read (e.g. an evaluation-only score, for the reader)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(PANELS) + (extra is not None)
    fig, grid = plt.subplots(len(runs), columns, figsize=(3.0 * columns, 2.9 * len(runs)), squeeze=False)
    for row, (run, monitor, title) in zip(grid, runs, strict=True):
        _row(row[: len(PANELS)], run, monitor, title)
        if extra is not None:
            ax = row[-1]
            points = [(r["step"], r[extra[1]]) for r in run.records if extra[1] in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, color="tab:purple")
            for alert in monitor.alerts:
                alarm = alert.severity == "alarm"
                ax.axvline(alert.step, color="tab:red" if alarm else "tab:orange", linestyle="-" if alarm else "--",
                           linewidth=1.6 if alarm else 0.8, alpha=0.9 if alarm else 0.6)
            ax.set_title(extra[0], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _row(axes, run: Run, monitor: RewardHackingMonitor, title: Optional[str]) -> str:
    series = signal_series(run, monitor.config.held_out)
    for ax, (panel, signals) in zip(axes, PANELS, strict=True):
        for name, label in signals:
            points = series.get(name)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, label=label)
        if panel.startswith("KL") and monitor.history is not None and monitor.history.records:
            b = bound(monitor.history)
            ax.axhline(b.budget, color="gray", linestyle=":", linewidth=1,
                       label="budget" + ("" if b.declared else " (default)"))
        for alert in monitor.alerts:
            alarm = alert.severity == "alarm"
            ax.axvline(alert.step, color="tab:red" if alarm else "tab:orange", linestyle="-" if alarm else "--",
                       linewidth=1.6 if alarm else 0.8, alpha=0.9 if alarm else 0.6)
        ax.set_title(panel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    first = monitor.alarms[0] if monitor.alarms else None
    note = (f"first alarm at step {first.step:g} ({first.signal})" if first else
            f"{len(monitor.alerts)} warning(s), no alarm")
    if title is not None:
        axes[0].set_ylabel(f"{title}\n{note}", fontsize=7)
    return note
