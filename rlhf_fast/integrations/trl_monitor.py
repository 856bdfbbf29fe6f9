"""The reward-hacking monitor inside TRL: a ``TrainerCallback`` that reads what the trainer logs.

::

    from rlhf_fast.integrations.trl_monitor import RewardHackingCallback
    trainer = GRPOTrainer(..., callbacks=[RewardHackingCallback(stop_on_alarm=True)])

At every ``on_log`` it passes TRL's logged metrics (``kl``, ``reward``, ``reward_std``,
``completions/mean_length``, ``clip_ratio/region_mean``, ``entropy``) to a
:class:`~rlhf_fast.monitor.RewardHackingMonitor`; TRL's ``beta`` and ``epsilon`` come from the
trainer's arguments. With ``rlhf_fast.integrations.trl`` (``RLHFFastGRPOTrainer`` / ``equip``),
which logs the within-batch correlation of advantage and completion length
(``rlhf_fast/advantage_length_corr``) and hands this callback the KL to the reference of each
completion token (when ``beta != 0``), the monitor also sees how the proxy pays for length in each
batch and names the tokens that carry the KL. Nothing is computed on the hot path: the callback
reads logs, at logging steps.

Alarms and warnings are written through ``logging`` (logger ``rlhf_fast.monitor``), kept in
``callback.alerts`` and, with ``stop_on_alarm``, end the training after the step that raised one
(``control.should_training_stop``).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

from transformers import TrainerCallback

from ..monitor import Alert, RewardHackingMonitor

__all__ = ["RewardHackingCallback"]

logger = logging.getLogger("rlhf_fast.monitor")


class RewardHackingCallback(TrainerCallback):
    """Runs :class:`~rlhf_fast.monitor.RewardHackingMonitor` on a TRL trainer's logs.

    ``kl_budget``: nats per completion the run may spend (default ln 100, see docs/monitor.md);
    ``held_out``: logged keys of held-out scores (e.g. ``"rewards/judge/mean"`` of a reward function
    with weight 0) to watch against the proxy; ``decode``: token id → text for the KL's tokens
    (default: the trainer's tokenizer); ``monitor``: a monitor of your own instead.
    """

    def __init__(self, *, kl_budget: Optional[float] = None, held_out=(), stop_on_alarm: bool = False,
                 decode: Optional[Callable[[int], str]] = None, monitor: Optional[RewardHackingMonitor] = None):
        self.options = dict(kl_budget=kl_budget, held_out=tuple(held_out))
        self.stop_on_alarm = bool(stop_on_alarm)
        self.decode = decode
        self.monitor = monitor
        if monitor is None:  # check the options now, not at the first log
            RewardHackingMonitor(trainer="trl", **self.options)
        self._token_sums: Dict[int, float] = {}
        self._token_rows = 0

    @property
    def alerts(self) -> List[Alert]:
        return [] if self.monitor is None else self.monitor.alerts

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        if self.monitor is None:
            decode = self.decode
            if decode is None and processing_class is not None and hasattr(processing_class, "decode"):
                decode = lambda token_id: processing_class.decode([token_id])  # noqa: E731
            beta = getattr(args, "beta", None)
            eps = getattr(args, "epsilon", None)
            self.monitor = RewardHackingMonitor(
                trainer="trl", kl_penalty="loss", beta=None if beta is None else float(beta),
                clip_eps=float(eps) if eps else 0.2, decode=decode, **self.options)
        return control

    def add_token_kl(self, token_ids, kl, mask) -> None:
        """One micro-batch's per-token KL to the reference (``[B, T]`` tensors; called by the rlhf_fast
        TRL integration). Summed per token id until the next log."""
        from ..monitor import token_kl_sums

        rows = int(mask.shape[0])
        for token, per_reply in token_kl_sums(kl, kl.new_zeros(()), token_ids, mask).items():
            self._token_sums[token] = self._token_sums.get(token, 0.0) + per_reply * rows
        self._token_rows += rows

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.monitor is None or any(k.startswith("eval_") for k in logs):
            return control
        token_kl = None
        if self._token_rows:
            token_kl = {t: s / self._token_rows for t, s in self._token_sums.items()}
            self._token_sums, self._token_rows = {}, 0
        alerts = self.monitor.update(logs, step=state.global_step, token_kl=token_kl)
        for alert in alerts:
            (logger.error if alert.severity == "alarm" else logger.warning)(
                "reward-hacking monitor %s %s", alert.severity.upper(), alert.message)
        if self.stop_on_alarm and any(a.severity == "alarm" for a in alerts):
            control.should_training_stop = True
        return control
