"""The typed records of the PPO loop: sampled replies, a step's rollout, a step's metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import torch


class Samples(NamedTuple):
    """Sampled replies with their prompts, as :func:`sample_replies` returns them."""

    input_ids: torch.Tensor  # [B, P+R] prompt (left-padded) then reply (right-padded)
    attention_mask: torch.Tensor  # [B, P+R] long, 1 on prompt and reply tokens (EOS included)
    position_ids: torch.Tensor  # [B, P+R] positions counting valid tokens only
    prompt_len: int  # P
    response_ids: torch.Tensor  # [B, R] reply tokens (pad after EOS)
    response_mask: torch.Tensor  # [B, R] bool, True up to and including EOS
    lengths: torch.Tensor  # [B] long, reply length in tokens
    has_eos: torch.Tensor  # [B] bool, False when the reply hit max_new_tokens
    sampling_logprobs: Optional[torch.Tensor] = None  # [B, R] fp32, the sampler's own log-probs (0 at padding)

    def replies(self) -> List[List[int]]:
        """The replies as unpadded token-id lists (EOS included when there is one)."""
        return [r[m].tolist() for r, m in zip(self.response_ids.cpu(), self.response_mask.cpu())]


class Rollout(NamedTuple):
    """One step's replies and everything computed from them before the update.

    ``B`` = batch × samples_per_prompt replies (the samples of a prompt are contiguous),
    ``P`` = prompt length (left-padded), ``R`` = longest reply (right-padded after EOS).
    """

    samples: Samples  # the replies with their prompts
    old_logprobs: torch.Tensor  # [B, R] fp32, sampling policy at τ, 0 at padding
    ref_logprobs: torch.Tensor  # [B, R] fp32, reference at τ, 0 at padding
    entropy: torch.Tensor  # [B, R] fp32, sampling policy's entropy at τ
    values: Optional[torch.Tensor]  # [B, R] critic values (GAE) or None
    raw_scores: torch.Tensor  # [B] reward model output
    norm_scores: torch.Tensor  # [B] raw scores normalised by the RM's calibration (= raw without one)
    scores: torch.Tensor  # [B] normalised (if asked) minus penalties
    rewards: torch.Tensor  # [B, R] per-token reward: −β·k1 (KL in reward) + score at the last token
    raw_advantages: torch.Tensor  # [B, R] (GAE) or [B] (GRPO, RLOO), before whitening
    advantages: torch.Tensor  # [B, R] (GAE) or [B] (GRPO, RLOO), as fed to the loss
    returns: Optional[torch.Tensor]  # [B, R] value targets (GAE) or None


@dataclass
class StepRecord:
    """What one step reports: ``step`` (1-based), the flat ``metrics`` of :data:`METRICS` and the
    reward-hacking monitor's ``alerts`` raised at this step (``{"step", "signal", "severity", "message"}``)."""

    step: int
    metrics: Dict[str, float]
    alerts: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """One line of ``metrics.jsonl``: the step, the metrics, and ``"monitor"`` when alerts were raised."""
        return {"step": self.step, **self.metrics, **({"monitor": self.alerts} if self.alerts else {})}


METRICS: Dict[str, str] = {
    "score_raw_mean": "reward-model score, raw, mean over replies",
    "score_raw_std": "reward-model score, raw, std over replies",
    "score_norm_mean": "reward-model score normalised by its calibration, mean",
    "score_norm_std": "reward-model score normalised by its calibration, std",
    "score_mean": "score entering the reward (normalised if asked, minus penalties), mean",
    "score_std": "score entering the reward, std over replies",
    "reward_mean": "total reward per reply (score − β·Σk1 when KL is in the reward), mean",
    "kl_ref_k1_sum": "KL to the reference, k1 summed over a reply, mean over replies (the controller's KL)",
    "kl_ref_k1_mean": "KL to the reference, k1 per token, mean over tokens",
    "kl_ref_k3_sum": "KL to the reference, k3 summed over a reply, mean over replies",
    "kl_ref_k3_mean": "KL to the reference, k3 per token, mean over tokens",
    "kl_coef": "β used in this step",
    "kl_coef_next": "β after the controller update",
    "lr": "learning rate of the policy in this step's updates (lr × the lr_schedule factor)",
    "loss_kl": "the loss's KL estimator (kl_estimator) of the updated policy, mean over updates",
    "pg_loss": "clipped surrogate, mean over updates",
    "clipfrac": "fraction of tokens whose surrogate is clipped, mean over updates",
    "clipfrac_lower": "fraction of tokens where the dual clip is active, mean over updates",
    "ratio_mean": "new/old probability ratio, mean over updates",
    "ratio_min": "smallest ratio seen in the step",
    "ratio_max": "largest ratio seen in the step",
    "ratio_above": "fraction of tokens with ratio > 1 + ε_high before clipping, mean over updates",
    "ratio_below": "fraction of tokens with ratio < 1 − ε_low before clipping, mean over updates",
    "approx_kl": "mean of (r − 1) − log r (old → new), mean over updates",
    "approx_kl_max": "largest minibatch approx_kl in the step",
    "entropy": "entropy of the sampling policy at τ, per token",
    "adv_mean": "advantage fed to the loss, mean (tokens for GAE, replies otherwise)",
    "adv_std": "advantage fed to the loss, std",
    "adv_max": "advantage fed to the loss, max",
    "adv_raw_std": "advantage before whitening, std",
    "adv_raw_max": "advantage before whitening, max |A|",
    "adv_frac_large": "share of advantages fed to the loss more than 2 standard deviations above their mean",
    "response_length_mean": "reply length in tokens (EOS included), mean",
    "response_length_max": "reply length, max",
    "frac_truncated": "fraction of replies that hit max_new_tokens without EOS",
    "score_length_corr": "Pearson correlation of raw score with reply length",
    "value_explained_var": "1 − Var(returns − values)/Var(returns) at rollout (0 without a critic)",
    "value_loss": "clipped value loss, mean over updates (0 without a critic)",
    "value_clipfrac": "fraction of tokens whose value update is clipped (0 without a critic)",
    "grad_norm": "gradient norm before clipping, mean over updates",
    "epochs_run": "minibatch updates done / minibatches per epoch (< epochs after an early stop)",
    "early_stopped": "1 when approx_kl > 1.5× early_stop_approx_kl stopped the epoch loop",
    "step_time_s": "wall time of the step",
}
"""Every key of :attr:`StepRecord.metrics` (``extra_metrics`` adds its own; a rollout correction adds
:data:`ROLLOUT_CORRECTION_METRICS`, the adaptive KL controller :data:`ADAPTIVE_KL_METRICS`)."""

ROLLOUT_CORRECTION_METRICS: Dict[str, str] = {
    "rollout_weight_mean": "rollout importance weight w (rollout_is), mean over tokens and updates",
    "rollout_weight_max": "rollout importance weight w, max over tokens, mean over updates",
    "rollout_weight_masked": "fraction of tokens with w = 0 (rollout_is='mask'), mean over updates",
}
"""Keys of :attr:`StepRecord.metrics` when ``rollout_is`` is not "none"."""

ADAPTIVE_KL_METRICS: Dict[str, str] = {
    "kl_target": "the adaptive controller's KL budget per reply (what the reward-hacking monitor holds the KL to)",
}
"""Keys of :attr:`StepRecord.metrics` when ``adaptive_kl`` is on."""
