"""``python -m rlhf_fast monitor PATH [--json] [--plot OUT.png]``: the reward-hacking monitor over a finished run.

PATH: an rlhf_fast run folder or ``metrics.jsonl``, TRL's ``trainer_state.json`` (or its output
folder), or a JSONL / CSV of per-step metrics exported from verl or a tracker. Prints each warning
and alarm with its step, diagnosis and recommended change; ``--json`` prints exactly one JSON object
instead, whose ``alarms`` is the list of ``{"step", "signal", "severity", "message"}``
(``severity`` "warning" or "alarm"; empty when the run looks healthy). ``--plot`` draws the signals
over the steps with the alerts marked. A path it cannot read gives one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .offline import MonitorInputError, analyse, load

COMMAND = "monitor"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run folder, metrics.jsonl, trainer_state.json, or a JSONL/CSV of per-step "
                                     "metrics (rlhf_fast's, TRL's or verl's metric names)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object: {"verdict", "alarms": [{"step", "signal", "severity", '
                             '"message"}, ...], ...}')
    parser.add_argument("--plot", metavar="OUT.png", default=None,
                        help="write a figure of the signals over the steps with the warnings and alarms marked")
    parser.add_argument("--kl-budget", type=float, default=None,
                        help="the run's KL budget to the reference, nats per reply (default: the KL controller's "
                             "target when the records carry one, else ln 100)")
    parser.add_argument("--beta", type=float, default=None,
                        help="the run's KL coefficient when its records do not carry it (TRL logs none: "
                             "GRPOConfig.beta)")
    parser.add_argument("--held-out", action="append", default=[], metavar="KEY",
                        help="a record key holding a held-out score you logged (a judge, a classifier), watched "
                             "against the proxy; repeat for several")


def _fail(message: str) -> int:
    print(f"python -m rlhf_fast {COMMAND}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def main(args: argparse.Namespace) -> int:
    if args.kl_budget is not None and not args.kl_budget > 0:
        return _fail(f"--kl-budget must be a number of nats per reply > 0, got {args.kl_budget}")
    if args.beta is not None and not args.beta >= 0:
        return _fail(f"--beta must be a KL coefficient >= 0, got {args.beta}")
    if args.plot is not None and not args.plot.lower().endswith((".png", ".pdf", ".svg")):
        return _fail(f"--plot {args.plot}: give a file name ending in .png, .pdf or .svg")
    try:
        run = load(args.path)
        monitor = analyse(run, kl_budget=args.kl_budget, beta=args.beta, held_out=tuple(args.held_out))
    except MonitorInputError as exc:
        return _fail(str(exc))
    summary = {"path": run.source, **monitor.summary()}
    if args.plot is not None:
        from .plot import plot_run

        try:
            plot_run(run, monitor, args.plot)
        except OSError as exc:
            return _fail(f"--plot {args.plot}: cannot write it ({exc.strerror or exc})")
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(_json_ready(summary), allow_nan=False))
        return 0
    bound = summary["kl_bound"] or {}
    print(f"{run.source}: {summary['records']} records ({run.trainer}); KL bound: {bound.get('kind')}, budget "
          f"{bound.get('budget', math.nan):.2f} nats/reply{'' if bound.get('declared') else ' (default)'}")
    for alert in monitor.alerts:
        print(f"\n{alert.severity.upper()} [{alert.signal}] {alert.message}")
    if monitor.alarms:
        verdict = f"ALARM: reward hacking likely (first alarm at step {monitor.alarms[0].step:g})"
    else:
        verdict = f"{len(monitor.alerts)} warning(s), no alarm" if monitor.alerts else "no warning, no alarm"
    print(f"\nverdict: {verdict}")
    if args.plot is not None:
        print(f"figure: {args.plot}")
    return 0
