"""The one place that knows TRL's ``GRPOTrainer`` internals, written for TRL 1.16.0 (:data:`WRITTEN_FOR`).

:mod:`rlhf_fast.integrations.trl` replaces one private method of a ``GRPOTrainer`` instance,
``_compute_loss(model, inputs)`` (:func:`install`), and reads what TRL's own ``_compute_loss``
reads: the micro-batch dict that ``_prepare_inputs`` builds (:class:`MicroBatch`), the entropy
bonus's state (``_entropy_bonus_enabled``, ``entropy_coef``, ``use_adaptive_entropy``,
``_last_world_entropy``, ``_entropy_window_stats``), the metric lists ``_metrics[mode]``,
``current_gradient_accumulation_steps``, ``use_vllm``, ``aux_loss_enabled`` and two helpers of
``trl.trainer.utils``. Nothing else in rlhf_fast names them, so a TRL release that moves them is
adapted here. :func:`check` refuses a trainer without the method it replaces and warns when the
installed TRL is not the version this module was written and tested for.
"""

from __future__ import annotations

import types
import warnings
from contextlib import nullcontext
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

__all__ = ["WRITTEN_FOR", "MicroBatch", "accumulation_steps", "aux_loss_enabled", "check", "entropy_bonus_enabled",
           "entropy_coef", "epsilon_high", "gather_lm_head", "install", "metrics", "mode", "nanmax", "nanmin",
           "rollout_correction", "update_entropy_controller"]

WRITTEN_FOR = "1.16.0"
"""The TRL release whose ``GRPOTrainer`` this module reads (the ``[trl]`` extra pins it)."""

_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                     "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check(trainer) -> None:
    """Raise ``RuntimeError`` if ``trainer`` has no ``_compute_loss`` to replace; warn if TRL is not
    :data:`WRITTEN_FOR`."""
    if not callable(getattr(trainer, "_compute_loss", None)):
        raise RuntimeError(f"this GRPOTrainer (TRL {trl.__version__}) has no _compute_loss(model, inputs), the method "
                           f"rlhf_fast replaces; rlhf_fast.integrations.trl is written for TRL {WRITTEN_FOR} "
                           f"(pip install trl=={WRITTEN_FOR})")
    if trl.__version__ != WRITTEN_FOR:
        warnings.warn(f"rlhf_fast.integrations.trl is written and tested for TRL {WRITTEN_FOR}, and TRL "
                      f"{trl.__version__} is installed: the loss reproduces TRL {WRITTEN_FOR}'s, which this release "
                      f"may compute differently (pip install trl=={WRITTEN_FOR}, the [trl] extra, to be sure)",
                      stacklevel=3)


class MicroBatch(NamedTuple):
    """One micro-batch as TRL hands it to ``_compute_loss`` (``[B, ·]`` tensors)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] the tokens the loss sees: completion_mask, times TRL's tool_mask when there is one
    advantages: torch.Tensor  # [B] (or [B, T] from a subclass)
    old_logprobs: Optional[torch.Tensor]  # [B, T]; None when TRL skips them (on-policy)
    ref_logprobs: Optional[torch.Tensor]  # [B, T]; present when beta != 0
    sampling_logprobs: Optional[torch.Tensor]  # [B, T] vLLM's, NaN where vLLM could not score a token
    num_items_in_batch: Optional[torch.Tensor]  # completion tokens of the whole generation batch
    model_inputs: Dict[str, torch.Tensor]  # what else the model's forward takes (vision inputs, token types)

    @classmethod
    def read(cls, inputs) -> MicroBatch:
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        return cls(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], completion_mask, mask,
                   inputs["advantages"], inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps"),
                   inputs.get("sampling_per_token_logps"), inputs.get("num_items_in_batch"),
                   {key: inputs[key] for key in _MODEL_INPUT_KEYS if inputs.get(key) is not None})


def install(trainer, compute_loss: Callable[..., torch.Tensor]) -> None:
    """Make ``trainer``'s loss ``compute_loss(trainer, model, batch: MicroBatch)`` (on this instance)."""
    def _compute_loss(self, model, inputs):
        return compute_loss(self, model, MicroBatch.read(inputs))

    trainer._compute_loss = types.MethodType(_compute_loss, trainer)


def mode(trainer) -> str:
    return "train" if trainer.model.training else "eval"


def accumulation_steps(trainer, mode: str) -> float:
    """What TRL divides a micro-batch's loss by for gradient accumulation (1 in evaluation)."""
    return float(trainer.current_gradient_accumulation_steps) if mode == "train" else 1.0


def epsilon_high(args) -> float:
    """TRL's ε_high: ``epsilon_high``, or ``epsilon`` when it is None."""
    return args.epsilon_high if args.epsilon_high is not None else args.epsilon


def rollout_correction(trainer) -> bool:
    """Whether TRL weights the loss by vLLM's importance-sampling ratio."""
    return bool(getattr(trainer, "use_vllm", False) and trainer.args.vllm_importance_sampling_correction)


def aux_loss_enabled(trainer) -> bool:
    """Whether TRL adds the MoE router's auxiliary loss."""
    return bool(getattr(trainer, "aux_loss_enabled", False))


def entropy_bonus_enabled(trainer) -> bool:
    return bool(getattr(trainer, "_entropy_bonus_enabled", False))


def entropy_coef(trainer) -> float:
    """The entropy bonus coefficient TRL applies in this micro-batch (adaptive gating included)."""
    if not entropy_bonus_enabled(trainer):
        return 0.0
    if trainer.use_adaptive_entropy:
        return float(trainer.entropy_coef) if trainer._last_world_entropy <= trainer.args.entropy_target else 0.0
    return float(trainer.entropy_coef)


def metrics(trainer, mode: str) -> Dict[str, List[float]]:
    """TRL's metric lists of ``mode`` (averaged at each log)."""
    return trainer._metrics[mode]


def update_entropy_controller(trainer, mode: str, entropy: torch.Tensor, mask: torch.Tensor) -> None:
    """TRL's adaptive entropy controller and its ``entropy_coef`` log (same state, same rule)."""
    if trainer.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropy * mask).sum(), mask.sum()]).detach()
        window = getattr(trainer, "_entropy_window_stats", None)
        trainer._entropy_window_stats = stats if window is None else window + stats
        if trainer.accelerator.sync_gradients:
            totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            delta = trainer.args.entropy_coef_delta
            if world_entropy <= trainer.args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + delta, trainer.args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - delta, trainer.args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and trainer.accelerator.sync_gradients:
        metrics(trainer, mode)["entropy_coef"].append(trainer.entropy_coef)


def gather_lm_head(*params):
    """ZeRO-3: gather the partitioned LM head for a direct read, as TRL does for its own fused head."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover - a TRL without it
        return nullcontext()
    return maybe_gather_lm_head_ctx(*params)
