"""Early warning of reward hacking from a run's per-step metrics (docs/monitor.md).

:class:`RewardHackingMonitor` reads one record of per-step training metrics at a time (rlhf_fast's,
TRL's or verl's metric names) and raises warnings and alarms; each alarm names the step, the
signals and their values, a diagnosis and the one change to make. It depends on no trainer:
the PPO loop runs it at every step, ``rlhf_fast.integrations.trl_monitor`` and
``rlhf_fast.integrations.verl_monitor`` plug it into TRL and verl, and
``python -m rlhf_fast monitor PATH`` runs it over a finished run.
"""

from .core import SEVERITIES, Alert, RewardHackingMonitor
from .detectors import DETECTORS
from .offline import MonitorInputError, Run, analyse, load
from .signals import ADAPTERS, SIGNALS, canonical, detect
from .tokens import TokenKL, token_kl_sums

__all__ = [
    "ADAPTERS", "DETECTORS", "SEVERITIES", "SIGNALS", "Alert", "MonitorInputError", "RewardHackingMonitor", "Run",
    "TokenKL", "analyse", "canonical", "detect", "load", "token_kl_sums",
]
