"""``RewardHackingMonitor``: one record of per-step metrics at a time in, warnings and alarms out.

Each record is mapped to the canonical signals (:mod:`.signals`), appended to a short history
(:mod:`.state`) and read by every detector (:mod:`.detectors`). A detector's condition is reported
once it has held on ``persistence`` consecutive records: as a **warning**, or as an **alarm** when
the detector can stand alone (the KL at twice a declared budget, a held-out score falling while
the proxy rises). The compound **alarm** ``kl_drift+<evidence>`` needs both halves at once, each
persistent: the KL drifting with nothing to bound it, and the drift going where the proxy
over-pays (length, an advantage tail). Every alarm names the step, the signals with their values,
a diagnosis and the one change to make, with its numbers (:mod:`.advice`).

The state is small: the first and the last ``window`` records' signals, per-detector counters and
(when a trainer provides per-token KL) a window of per-token-id sums.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional

from . import advice, detectors
from .signals import ADAPTERS, OURS, Adapter, canonical, detect, kl_penalty_of
from .state import History, MonitorConfig
from .tokens import TokenKL

SEVERITIES = ("warning", "alarm")


class Alert(NamedTuple):
    """One warning or alarm."""

    step: float
    signal: str
    """The detector (``kl_budget``, ``length_coupling``, ...) or the compound ``kl_drift+<evidence>``."""
    severity: str
    """"warning" or "alarm"."""
    message: str
    values: Dict[str, float]

    def to_dict(self) -> Dict:
        """``{"step", "signal", "severity", "message"}`` (what ``--json`` and ``metrics.jsonl`` hold)."""
        step = int(self.step) if float(self.step).is_integer() else self.step
        return {"step": step, "signal": self.signal, "severity": self.severity, "message": self.message}


class RewardHackingMonitor:
    """Early warning of reward hacking from a run's per-step metrics; no dependency on any trainer.

    ``update(record)`` takes one step's metrics as a plain dict (rlhf_fast's, TRL's or verl's names:
    ``trainer`` picks the adapter, "auto" detects it from the first record) and returns the alerts
    raised at that step. Keys no adapter names are ignored: evaluation-only numbers never reach
    the detectors. ``held_out`` names record keys of held-out scores to watch against the proxy;
    ``decode(token_id) -> str`` names the tokens that carry the KL in messages.
    """

    def __init__(self, *, kl_budget: Optional[float] = None, kl_penalty: Optional[str] = None,
                 beta: Optional[float] = None, clip_eps: float = 0.2, held_out=(), trainer: str = "auto",
                 decode: Optional[Callable[[int], str]] = None, window: int = detectors.WINDOW,
                 persistence: int = detectors.PERSISTENCE, top_k: int = 5):
        config = MonitorConfig(kl_budget=None if kl_budget is None else float(kl_budget), kl_penalty=kl_penalty,
                               beta=None if beta is None else float(beta), clip_eps=float(clip_eps),
                               held_out=tuple(held_out), window=int(window), persistence=int(persistence))
        problems = config.problems()
        if trainer != "auto" and trainer not in ADAPTERS:
            problems.append(f"trainer must be 'auto' or one of {tuple(ADAPTERS)}, got {trainer!r}")
        if problems:
            raise ValueError("invalid RewardHackingMonitor settings:\n  - " + "\n  - ".join(problems))
        self.config = config
        self.adapter: Optional[Adapter] = None if trainer == "auto" else ADAPTERS[trainer]
        self.tokens = TokenKL(window=config.window, top_k=top_k, decode=decode)
        self.history: Optional[History] = None
        self.alerts: List[Alert] = []
        self._streak: Dict[str, int] = {}
        self._alarm_streak: Dict[str, int] = {}
        self._clear: Dict[str, int] = {}
        self._warned: Dict[str, bool] = {}
        self._alarmed: Dict[str, bool] = {}
        self._findings: Dict[str, detectors.Finding] = {}

    # ------------------------------------------------------------------ input
    def update(self, record: Mapping[str, float], step: Optional[float] = None,
               token_kl: Optional[Mapping[int, float]] = None) -> List[Alert]:
        """Read one step's metrics; returns the alerts raised at this step (also kept in ``alerts``).

        ``step``: the trainer's step (default ``record["step"]``, else the record's position).
        ``token_kl``: ``{token id: KL per reply carried by it}`` for this step, when the trainer has
        per-token log-probs of the policy and the reference (:func:`.tokens.token_kl_sums`).
        """
        if self.adapter is None:
            name = detect(record)
            if name is None:
                return []  # not a training record (an evaluation log, a run summary)
            self.adapter = ADAPTERS[name]
        signals = canonical(record, self.adapter, self.config.held_out)
        if not signals:
            return []
        if self.history is None:
            penalty = self.config.kl_penalty or kl_penalty_of(self.adapter, record)
            self.history = History(self.config, penalty)
        if step is None:
            step = record.get("step", self.history.records + 1)
        if token_kl:
            self.tokens.add(token_kl)
        step = float(step)
        return self.observe(signals, int(step) if step.is_integer() else step)

    def observe(self, signals: Dict[str, float], step: float) -> List[Alert]:
        """Like :meth:`update` on signals already canonical (:data:`.signals.SIGNALS`)."""
        if self.history is None:
            self.history = History(self.config, self.config.kl_penalty or OURS.kl_penalty)
        h = self.history
        h.add(step, signals)
        persistence = self.config.persistence
        raised: List[Alert] = []
        findings: Dict[str, detectors.Finding] = {}
        for name, detect_fn in detectors.DETECTORS.items():
            finding = detect_fn(h)
            if finding is None:
                self._streak[name] = self._alarm_streak[name] = 0
                self._clear[name] = self._clear.get(name, 0) + 1
                if self._clear[name] >= self.config.window:
                    self._warned[name] = False  # clear for a whole window: a recurrence is news again
                continue
            findings[name] = finding
            self._clear[name] = 0
            self._streak[name] = self._streak.get(name, 0) + 1
            self._alarm_streak[name] = self._alarm_streak.get(name, 0) + 1 if finding.grade == "alarm" else 0
        self._findings = findings

        # the compound alarm: drift with nothing to bound it, and the drift going where the proxy over-pays
        drift = findings.get("kl_drift")
        evidence = [n for n, f in findings.items() if f.role == "exploit" and self._streak[n] >= persistence]
        if (drift is not None and drift.role == "drift" and self._streak["kl_drift"] >= persistence and evidence
                and not self._alarmed.get("compound")):
            self._alarmed["compound"] = True
            for name in ("kl_drift", *evidence):
                self._warned[name] = True  # said in the alarm: no separate warning
            signal = "+".join(["kl_drift", *evidence])
            parts = [drift] + [findings[n] for n in evidence]
            raised.append(self._alarm(step, signal, parts))

        for name, finding in findings.items():
            if self._alarm_streak.get(name, 0) >= persistence and not self._alarmed.get(name):
                self._alarmed[name] = True
                raised.append(self._alarm(step, name, [finding]))
            elif self._streak[name] >= persistence and not self._warned.get(name) and not self._alarmed.get(name):
                self._warned[name] = True
                raised.append(Alert(step, name, "warning", _message(step, finding.diagnosis), finding.values))
        self.alerts.extend(raised)
        return raised

    # ------------------------------------------------------------------ output
    def _alarm(self, step: float, signal: str, parts: List[detectors.Finding]) -> Alert:
        values: Dict[str, float] = {}
        for part in parts:
            values.update(part.values)
        diagnosis = " ".join(p.diagnosis for p in parts)
        carried = self.tokens.describe()
        if carried:
            diagnosis += f" The KL is carried by: {carried}."
        change = advice.recommend(self.history, self.adapter.name if self.adapter else "rlhf_fast", signal)
        return Alert(step, signal, "alarm", _message(step, f"Reward hacking likely. {diagnosis} {change}"), values)

    @property
    def alarms(self) -> List[Alert]:
        return [a for a in self.alerts if a.severity == "alarm"]

    @property
    def warnings(self) -> List[Alert]:
        return [a for a in self.alerts if a.severity == "warning"]

    @property
    def verdict(self) -> str:
        """"alarm", "warning" or "ok" (the worst alert so far)."""
        return "alarm" if self.alarms else "warning" if self.alerts else "ok"

    def active(self) -> Dict[str, str]:
        """Detectors whose condition holds at the latest record: ``{name: diagnosis}``."""
        return {name: f.diagnosis for name, f in self._findings.items()}

    def summary(self) -> Dict:
        """The verdict, the alerts and what the monitor knew: a JSON-ready dict."""
        h = self.history
        b = detectors.bound(h) if h is not None and h.records else None
        return {
            "verdict": self.verdict,
            "alarms": [a.to_dict() for a in self.alerts],
            "records": h.records if h is not None else 0,
            "last_step": h.step if h is not None else None,
            "trainer": self.adapter.name if self.adapter else None,
            "kl_bound": None if b is None else {
                "kind": b.kind, "budget": b.budget, "declared": b.declared,
                "ceiling": b.ceiling if b.ceiling is not None and math.isfinite(b.ceiling) else None},
            "tokens_carrying_kl": [
                {"token": self.tokens.name(t.token_id), "token_id": t.token_id, "kl": t.kl, "share": t.share}
                for t in self.tokens.top()
            ],
        }


def _message(step: float, text: str) -> str:
    step_text = f"{int(step)}" if float(step).is_integer() else f"{step:g}"
    return f"step {step_text}: {text}"
