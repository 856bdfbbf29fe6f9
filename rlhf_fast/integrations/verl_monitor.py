"""The reward-hacking monitor inside verl: a hook on the per-step metrics dict verl's trainer logs.

verl's ``RayPPOTrainer.fit`` gathers each step's metrics in one dict (``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/kl_loss`` or ``actor/reward_kl_penalty``, ``critic/score/mean``,
``critic/advantages/max``, ``response_length/mean``, ``actor/entropy``, ...) and hands it to its
``Tracking`` logger. :func:`install` wraps ``Tracking``: when a tracker is created it sets up a
:class:`VerlMonitorHook` from the run's config (where the KL acts, the adaptive controller's target,
the clip range), and every dict logged afterwards goes through the hook before the backends see
it. The hook adds ``monitor/warnings`` and ``monitor/alarms`` (counts so far) and, under an adaptive
controller, ``rlhf_fast/kl_target`` (its target per reply) to the dict, so the trackers keep them,
and logs each alert (logger ``rlhf_fast.monitor``); with ``stop_on_alarm`` it raises
:class:`RewardHackingStop` after logging the step that raised an alarm, which ends ``fit``.

Load it in the process that runs verl's trainer, e.g. through verl's own plugin variable::

    VERL_USE_EXTERNAL_MODULES=rlhf_fast.integrations.verl_monitor python -m verl.trainer.main_ppo ...

(importing the module installs the hook, configured by ``RLHF_FAST_MONITOR_KL_BUDGET`` (nats per
reply), ``RLHF_FAST_MONITOR_STOP_ON_ALARM=1`` and ``RLHF_FAST_MONITOR_ALERTS`` (a JSONL file the
alerts are appended to)), or call :func:`install` in your own driver. ``VerlMonitorHook`` also works
by hand on any stream of verl metric dicts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional

from ..monitor import Alert, RewardHackingMonitor

__all__ = ["RewardHackingStop", "VerlMonitorHook", "install", "settings_from_config"]

logger = logging.getLogger("rlhf_fast.monitor")

KL_TARGET_KEY = "rlhf_fast/kl_target"
"""Where the hook puts the adaptive controller's target per reply (verl's target is per token)."""


class RewardHackingStop(RuntimeError):
    """Raised by the hooked logger with ``stop_on_alarm`` after the step that raised an alarm."""


def _get(config: Mapping, path: str, default=None):
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def settings_from_config(config: Optional[Mapping]) -> Dict[str, Any]:
    """What verl's config says about the KL: ``kl_penalty`` ("reward"/"loss"), ``beta`` (0 when there is
    no KL term), ``kl_target_per_token`` (the adaptive controller's) and ``clip_eps``."""
    if not config:
        return {}
    out: Dict[str, Any] = {}
    actor = "actor_rollout_ref.actor"
    if _get(config, "algorithm.use_kl_in_reward", False):
        out["kl_penalty"] = "reward"
        if _get(config, "algorithm.kl_ctrl.type") == "adaptive":
            out["kl_target_per_token"] = float(_get(config, "algorithm.kl_ctrl.target_kl"))
    elif _get(config, f"{actor}.use_kl_loss", False):
        out["kl_penalty"] = "loss"
    else:
        out["beta"] = 0.0  # no KL term: nothing bounds the drift
    clip = _get(config, f"{actor}.clip_ratio_low", None) or _get(config, f"{actor}.clip_ratio", None)
    if clip:
        out["clip_eps"] = float(clip)
    return out


class VerlMonitorHook:
    """Feeds verl's per-step metric dicts to a :class:`~rlhf_fast.monitor.RewardHackingMonitor`.

    ``config``: verl's run config as a plain dict (``OmegaConf.to_container``), read by
    :func:`settings_from_config`; ``kl_budget``: nats per reply (default: the adaptive controller's
    target, else ln 100); ``alerts_path``: a JSONL file each alert is appended to.
    """

    def __init__(self, config: Optional[Mapping] = None, *, kl_budget: Optional[float] = None, held_out=(),
                 stop_on_alarm: bool = False, alerts_path: Optional[str] = None):
        settings = settings_from_config(config)
        self.kl_target_per_token = settings.pop("kl_target_per_token", None)
        self.monitor = RewardHackingMonitor(trainer="verl", kl_budget=kl_budget, held_out=held_out, **settings)
        self.stop_on_alarm = bool(stop_on_alarm)
        self.alerts_path = alerts_path

    @property
    def alerts(self) -> List[Alert]:
        return self.monitor.alerts

    def __call__(self, data: Dict[str, Any], step: Optional[int] = None) -> List[Alert]:
        """One logged dict: the alerts it raised (an evaluation dict raises none). Adds ``monitor/*`` counts."""
        length = data.get("response_length/mean")
        if self.kl_target_per_token is not None and isinstance(length, (int, float)):
            data[KL_TARGET_KEY] = self.kl_target_per_token * float(length)  # logged too: offline analysis sees it
        alerts = self.monitor.update(data, step=step)
        if "critic/score/mean" in data or "actor/pg_clipfrac" in data:
            data["monitor/warnings"] = float(len(self.monitor.warnings))
            data["monitor/alarms"] = float(len(self.monitor.alarms))
        for alert in alerts:
            (logger.error if alert.severity == "alarm" else logger.warning)(
                "reward-hacking monitor %s %s", alert.severity.upper(), alert.message)
            if self.alerts_path:
                with open(self.alerts_path, "a") as f:
                    f.write(json.dumps(alert.to_dict()) + "\n")
        return alerts


def install(*, kl_budget: Optional[float] = None, held_out=(), stop_on_alarm: Optional[bool] = None,
            alerts_path: Optional[str] = None) -> None:
    """Hook every ``verl.utils.tracking.Tracking`` created from now on (idempotent; the last settings win).

    Unset arguments come from ``RLHF_FAST_MONITOR_KL_BUDGET``, ``RLHF_FAST_MONITOR_STOP_ON_ALARM``
    and ``RLHF_FAST_MONITOR_ALERTS``.
    """
    from verl.utils.tracking import Tracking

    env = os.environ
    if kl_budget is None and env.get("RLHF_FAST_MONITOR_KL_BUDGET"):
        kl_budget = float(env["RLHF_FAST_MONITOR_KL_BUDGET"])
    if stop_on_alarm is None:
        stop_on_alarm = env.get("RLHF_FAST_MONITOR_STOP_ON_ALARM", "0") not in ("", "0", "false", "False")
    options = dict(kl_budget=kl_budget, held_out=tuple(held_out), stop_on_alarm=stop_on_alarm,
                   alerts_path=alerts_path or env.get("RLHF_FAST_MONITOR_ALERTS") or None)
    VerlMonitorHook(**options)  # check the options now
    original_init = getattr(Tracking.__init__, "_rlhf_fast_original", Tracking.__init__)
    original_log = getattr(Tracking.log, "_rlhf_fast_original", Tracking.log)

    def __init__(self, project_name, experiment_name, default_backend="console", config=None):
        original_init(self, project_name, experiment_name, default_backend=default_backend, config=config)
        self._rlhf_fast_monitor = VerlMonitorHook(config if isinstance(config, Mapping) else None, **options)

    def log(self, data, step, backend=None):
        hook = getattr(self, "_rlhf_fast_monitor", None)
        alerts = hook(data, step) if hook is not None and isinstance(data, dict) else []
        original_log(self, data=data, step=step, backend=backend)
        if hook is not None and hook.stop_on_alarm and any(a.severity == "alarm" for a in alerts):
            alarm = next(a for a in alerts if a.severity == "alarm")
            raise RewardHackingStop(f"stopped by the reward-hacking monitor (stop_on_alarm): {alarm.message}")

    __init__._rlhf_fast_original = original_init
    log._rlhf_fast_original = original_log
    Tracking.__init__ = __init__
    Tracking.log = log


install()
