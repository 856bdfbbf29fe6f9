"""A finished run's per-step metrics from disk, and the monitor run over them.

:func:`load` reads

* an rlhf_fast run folder or its ``metrics.jsonl`` (one ``{"step": ..., <metric>: ...}`` per line;
  the folder's ``config.json``, when the case study wrote one, supplies the KL controller's target
  and which score entered the reward for records of older versions that do not carry them);
* TRL's ``trainer_state.json`` (its ``log_history``), or a folder holding one (the latest
  ``checkpoint-*`` folder's when the top level has none);
* a JSONL of per-step metrics exported from verl or a tracker: flat objects, or verl's file
  logger's ``{"step": N, "data": {...}}``;
* a CSV with a header row of metric names (and a ``step``, ``_step``, ``global_step`` or
  ``Step`` column).

Anything else raises :class:`MonitorInputError` with what was expected.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

from .core import RewardHackingMonitor
from .signals import ADAPTERS, detect

STEP_KEYS = ("step", "_step", "global_step", "Step", "training/global_step")


class MonitorInputError(ValueError):
    """A path the monitor cannot read as a run's per-step metrics (the message says what it expected)."""


class Run(NamedTuple):
    records: List[Dict[str, float]]
    """Per-step metrics, each with a ``step``."""
    trainer: Optional[str]
    """"rlhf_fast", "trl", "verl" (by the metric names), or None."""
    settings: Dict
    """What the files say about the run: ``kl_budget`` / ``kl_penalty`` / ``beta`` / ``clip_eps``."""
    source: str
    """The file read."""


def _number(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _with_step(raw: Dict, position: int) -> Dict[str, float]:
    record = {k: v for k, v in ((k, _number(v)) for k, v in raw.items()) if v is not None}
    step = next((record[k] for k in STEP_KEYS if k in record), None)
    record["step"] = float(position + 1) if step is None or not math.isfinite(step) else step
    return record


def _read_jsonl(path: str) -> List[Dict[str, float]]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MonitorInputError(f"{path}, line {number}: not JSON ({exc.msg}); expected one JSON object of "
                                        "per-step metrics per line") from None
            if not isinstance(raw, dict):
                raise MonitorInputError(f"{path}, line {number}: expected a JSON object of per-step metrics, got "
                                        f"{type(raw).__name__}")
            if isinstance(raw.get("data"), dict):  # verl's file logger: {"step": N, "data": {...}}
                raw = {**raw["data"], "step": raw.get("step")}
            records.append(_with_step(raw, len(records)))
    return records


def _read_csv(path: str) -> List[Dict[str, float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MonitorInputError(f"{path}: no rows; expected a CSV whose header row names the metrics, one step per row")
    return [_with_step({k: v for k, v in row.items() if k is not None}, i) for i, row in enumerate(rows)]


def _read_trainer_state(path: str) -> List[Dict[str, float]]:
    try:
        with open(path) as f:
            state = json.load(f)
    except json.JSONDecodeError as exc:
        raise MonitorInputError(f"{path}: not JSON ({exc.msg})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise MonitorInputError(f"{path}: no 'log_history' list; expected TRL's trainer_state.json")
    return [_with_step(entry, i) for i, entry in enumerate(history) if isinstance(entry, dict)]


def _case_study_settings(folder: str) -> Dict:
    """The KL controller's target and the reward's scale from a case-study run's ``config.json``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            ppo = json.load(f).get("ppo_config", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    settings = {"clip_eps": ppo.get("clip_eps"), "kl_penalty": ppo.get("kl_placement"),
                "reward_normalize": ppo.get("reward_normalize")}
    if ppo.get("adaptive_kl"):
        settings["kl_target"] = ppo.get("kl_target")
    return {k: v for k, v in settings.items() if v is not None}


def _fill_ours(records: List[Dict[str, float]], settings: Dict) -> None:
    """Records of older rlhf_fast versions lack ``kl_target`` and ``score_std``: from the config."""
    for record in records:
        if "kl_target" not in record and "kl_target" in settings:
            record["kl_target"] = float(settings["kl_target"])
        if "score_std" not in record:
            key = "score_norm_std" if settings.get("reward_normalize") else "score_raw_std"
            if key in record:
                record["score_std"] = record[key]


def _file_in(folder: str) -> Tuple[str, str]:
    for name, kind in (("metrics.jsonl", "jsonl"), ("trainer_state.json", "trainer_state")):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name), kind
    checkpoints = sorted(glob.glob(os.path.join(folder, "checkpoint-*", "trainer_state.json")),
                         key=lambda p: int(p.split("checkpoint-")[-1].split(os.sep)[0])
                         if p.split("checkpoint-")[-1].split(os.sep)[0].isdigit() else -1)
    if checkpoints:
        return checkpoints[-1], "trainer_state"
    raise MonitorInputError(f"{folder}: no metrics.jsonl (an rlhf_fast run) or trainer_state.json (a TRL run) in it")


def load(path: str) -> Run:
    """The per-step metrics of the run at ``path`` (see the module doc for the formats)."""
    if not os.path.exists(path):
        raise MonitorInputError(f"{path}: no such file or folder; give a run folder, metrics.jsonl, "
                                "trainer_state.json, or a JSONL/CSV of per-step metrics")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(path):
        path, kind = _file_in(path)
    elif path.endswith(".csv"):
        kind = "csv"
    elif path.endswith(".jsonl"):
        kind = "jsonl"
    elif path.endswith(".json"):
        kind = "trainer_state"
    else:
        raise MonitorInputError(f"{path}: unknown format; expected a run folder, a .jsonl, a .csv, or TRL's "
                                "trainer_state.json")
    try:
        reader = {"jsonl": _read_jsonl, "csv": _read_csv, "trainer_state": _read_trainer_state}[kind]
        records = reader(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise MonitorInputError(f"{path}: cannot read it ({exc})") from None
    keys = set().union(*records) if records else set()
    trainer = detect(keys)
    if trainer is None:
        known = ", ".join(sorted({k for a in ADAPTERS.values() for keys_ in a.names.values() for k in keys_})[:8])
        raise MonitorInputError(f"{path}: none of its {len(records)} records carries a training metric the monitor "
                                f"knows (e.g. {known}, ...)")
    settings = _case_study_settings(folder) if trainer == "rlhf_fast" else {}
    if trainer == "rlhf_fast":
        _fill_ours(records, settings)
    return Run(records, trainer, settings, path)


def analyse(run: Run, **monitor_options) -> RewardHackingMonitor:
    """The monitor run over every record of ``run`` (its settings first, then ``monitor_options``)."""
    options = {k: run.settings[k] for k in ("clip_eps", "kl_penalty") if k in run.settings}
    options.update({k: v for k, v in monitor_options.items() if v is not None})
    monitor = RewardHackingMonitor(trainer=run.trainer or "auto", **options)
    for record in run.records:
        monitor.update(record, step=record["step"])
    return monitor
