"""TRL's ``GRPOTrainer`` with the loss computed by rlhf_fast from the last hidden states and the LM head.

Two ways in (docs/integrations.md)::

    from rlhf_fast.integrations.trl import RLHFFastGRPOTrainer, equip
    trainer = RLHFFastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)   # a drop-in
    trainer = equip(GRPOTrainer(...))                                                    # or equip one

Everything but the loss is TRL's: generation, rewards, advantages, old / reference / vLLM
log-probs, logging, checkpoints. The loss of each micro-batch is ``rf.fused_linear_ppo_loss``
on the backbone's hidden states and the LM head (with the model's logit scale or soft-cap,
:mod:`rlhf_fast.integrations.transformers`), never the ``[B, T, V]`` logits, with the options
:func:`loss_options` maps from the ``GRPOConfig`` and TRL's normalisation of each ``loss_type``
(gradient accumulation and ``num_items_in_batch`` included). TRL's metric names are logged
(``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``policy_loss``, ``entropy_coef``), plus
``rlhf_fast/advantage_length_corr`` (the within-batch correlation of advantage and completion length)
for the reward-hacking monitor, whose callback (:mod:`rlhf_fast.integrations.trl_monitor`) also
receives each completion token's KL to the reference.

What varies with the ``loss_type`` is one record each in :data:`LOSS_TYPES` (:class:`LossType`): its
policy term (a :class:`PolicyMapping` onto the loss's ``POLICY_LOSSES``), aggregation, normaliser and
metric family. The loss of a micro-batch is :mod:`rlhf_fast.integrations.trl_loss`; everything that
reads TRL's internals is :mod:`rlhf_fast.integrations.trl_shim`, written for TRL 1.16.0.

The entropy bonus (``entropy_coef``, ``use_adaptive_entropy``) is a token mean in TRL whatever
the ``loss_type``, while the policy term is weighted per ``loss_type``: where the two weightings
coincide (:attr:`LossType.bonus_in_loss`, ``bnpo``) the bonus is the loss's ``entropy_coef``; otherwise
the loss is the same per-token math on the differentiable fused log-probs and entropies of
``rf.fused_linear_logprobs``, with the bonus added as TRL adds it. Options with no rlhf_fast
equivalent raise at construction (:func:`unsupported`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

from trl import GRPOTrainer

from ..loss.options import LossOptions
from . import trl_shim as shim
from .transformers import UnsupportedModelError, lm_head
from .trl_loss import Setup, cispo_metrics, clip_ratio_metrics, compute_loss

__all__ = ["LOSS_TYPES", "REFUSED_LOSS_TYPES", "LossType", "PolicyMapping", "RLHFFastGRPOTrainer", "equip",
           "loss_options", "unsupported"]

_SEQUENCE_WEIGHT_CAP = 4.8e8
"""rlhf_fast's sequence-level rollout weight is exp(clamp(Σ log-ratio, −20, 20)) (docs/contract.md); TRL's has no
clamp. With an upper bound below e^20 ≈ 4.85e8 the two agree exactly: a weight above the bound is truncated to it
or masked either way. 4.8e8 is e^20 less 1%, so that fp32's rounding of e^20 (relative 6e-8) cannot put the bound
on the wrong side of our capped weight. Under e^−20 both weights are below 2.1e-9 (docs/integrations.md)."""


# ----------------------------------------------------------------------------------
# What each loss_type is in rlhf_fast's terms
# ----------------------------------------------------------------------------------


class PolicyMapping(NamedTuple):
    """How TRL's policy term of a ``loss_type`` maps onto a policy loss of ``rlhf_fast.loss.policy.POLICY_LOSSES``."""

    token: str  # the policy loss at importance_sampling_level="token"
    sequence: Optional[str]  # at "sequence"; None: the rlhf_fast variant has the token ratio only
    options: Callable[[Any], Dict[str, Any]]  # GRPOConfig -> the LossOptions fields of the policy term
    problems: Callable[[Any], List[str]]  # GRPOConfig -> what of its policy options the mapping cannot reproduce

    def variant(self, level: str) -> str:
        """The policy loss at ``importance_sampling_level=level`` (the token one where there is no other)."""
        return self.sequence if level == "sequence" and self.sequence is not None else self.token


def _clipped_options(args) -> Dict[str, Any]:
    # TRL's two-sided clip −min(min(r, δ)·A, clamp(r, 1 − ε_low, 1 + ε_high)·A) is the clipped surrogate with
    # ε_high' = min(ε_high, δ − 1) and the dual clip c = max(δ, 1 + ε_high), for every δ > 1.
    eps_high = shim.epsilon_high(args)
    high, dual = float(eps_high), None
    if args.delta is not None:
        high, dual = min(float(eps_high), float(args.delta) - 1.0), max(float(args.delta), 1.0 + float(eps_high))
    return dict(clip_eps=float(args.epsilon), clip_eps_high=high, dual_clip=dual)


def _clipped_problems(args) -> List[str]:
    if args.delta is not None and not args.delta > 1.0:
        return [f"delta={args.delta} must be > 1 (two-sided clipping caps the ratio at delta)"]
    return []


def _cispo_options(args) -> Dict[str, Any]:
    # TRL: −sg(min(r, ε_high))·A·lp, i.e. no lower clip and ε_high as the cap itself
    return dict(clip_eps=1.0, clip_eps_high=float(shim.epsilon_high(args)) - 1.0)


def _cispo_problems(args) -> List[str]:
    eps_high = shim.epsilon_high(args)
    if not eps_high > 1.0:
        return [f"loss_type='cispo' needs epsilon_high > 1 (TRL caps the ratio at epsilon_high itself; got "
                f"{eps_high}, the ScaleRL value is 5.0)"]
    return []


def _sapo_options(args) -> Dict[str, Any]:
    return dict(sapo_tau_pos=float(args.sapo_temperature_pos), sapo_tau_neg=float(args.sapo_temperature_neg))


CLIPPED = PolicyMapping("ppo", "gspo", _clipped_options, _clipped_problems)
CISPO = PolicyMapping("cispo", None, _cispo_options, _cispo_problems)
SAPO = PolicyMapping("sapo", None, _sapo_options, lambda args: [])


ACCUMULATION, GLOBAL_TOKENS = "accumulation steps", "global tokens"
"""What TRL divides a ``loss_type``'s micro-batch loss by (:attr:`LossType.normaliser`): the gradient accumulation
steps, or the completion tokens of the generation batch (``global_num_tokens``, rescaled to one accumulation window
and process)."""


class LossType(NamedTuple):
    """What TRL's ``loss_type`` decides, as rlhf_fast computes it."""

    policy: PolicyMapping
    aggregation: str  # loss_agg
    normaliser: str  # ACCUMULATION or GLOBAL_TOKENS
    all_sequences: bool  # TRL's mean is over all B sequences, fully masked ones included (times B_valid/B)
    norm_length: Optional[str]  # the GRPOConfig field that is norm_length
    metrics: Optional[Callable]  # TRL's metric family: (metrics, ratio, advantages, args, Means) -> None

    @property
    def global_tokens(self) -> bool:
        return self.normaliser == GLOBAL_TOKENS

    @property
    def bonus_in_loss(self) -> bool:
        """Whether TRL's entropy bonus, the micro-batch token mean over the accumulation steps, has the policy term's
        token weights, so that it is the loss's own ``entropy_coef``."""
        return self.aggregation == "token-mean" and self.normaliser == ACCUMULATION and not self.all_sequences


_ACC, _TOKENS, _CLIP = ACCUMULATION, GLOBAL_TOKENS, clip_ratio_metrics  # short names for the table
LOSS_TYPES: Dict[str, LossType] = {
    #                   policy   aggregation                by       all B  norm_length              metrics
    "grpo":    LossType(CLIPPED, "seq-mean-token-mean",     _ACC,    True,  None,                    _CLIP),
    "bnpo":    LossType(CLIPPED, "token-mean",              _ACC,    False, None,                    _CLIP),
    "dr_grpo": LossType(CLIPPED, "seq-mean-token-sum-norm", _ACC,    False, "max_completion_length", _CLIP),
    "dapo":    LossType(CLIPPED, "token-mean",              _TOKENS, False, None,                    _CLIP),
    "luspo":   LossType(CLIPPED, "seq-mean-token-sum",      _ACC,    True,  None,                    _CLIP),
    "cispo":   LossType(CISPO,   "token-mean",              _TOKENS, False, None,                    cispo_metrics),
    "sapo":    LossType(SAPO,    "seq-mean-token-mean",     _ACC,    True,  None,                    None),
}
"""Every ``loss_type`` rlhf_fast reproduces (docs/integrations.md has the same table in words)."""

REFUSED_LOSS_TYPES = {"vespo": "gamma-weighted sequence ratio"}
"""TRL's loss types with no rlhf_fast policy loss (TRL applies no vLLM weight to them either)."""


def unsupported(trainer) -> List[str]:
    """What this trainer's configuration asks for that rlhf_fast cannot compute exactly (empty: all of it)."""
    args = trainer.args
    loss_type, level = args.loss_type, args.importance_sampling_level
    record = LOSS_TYPES.get(loss_type)
    problems = []
    if loss_type in REFUSED_LOSS_TYPES:
        problems.append(f"loss_type={loss_type!r} ({REFUSED_LOSS_TYPES[loss_type]}) has no rlhf_fast policy loss")
    elif record is None:
        problems.append(f"loss_type={loss_type!r} is not one rlhf_fast maps ({', '.join(LOSS_TYPES)})")
    if level not in ("token", "sequence"):
        problems.append(f"importance_sampling_level={level!r} (token or sequence)")
    if level == "sequence" and record is not None and record.policy.sequence is None:
        problems.append(f"loss_type={loss_type!r} with importance_sampling_level='sequence' (rlhf_fast's "
                        f"{record.policy.token} uses the token ratio; use importance_sampling_level='token')")
    if level == "sequence" and args.beta != 0.0 and args.use_bias_correction_kl:
        problems.append("use_bias_correction_kl with importance_sampling_level='sequence' and beta != 0 (TRL weights "
                        "the KL by the sequence ratio, rlhf_fast's kl_ratio_weighted by the token ratio); set "
                        "use_bias_correction_kl=False or importance_sampling_level='token'")
    if record is not None:
        problems += record.policy.problems(args)
    if args.top_entropy_quantile < 1.0:
        problems.append(f"top_entropy_quantile={args.top_entropy_quantile} (masking the policy term by an entropy "
                        "quantile); use 1.0")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold (off-policy sequence masking); use None")
    if shim.aux_loss_enabled(trainer):
        problems.append("the MoE router auxiliary loss (router_aux_loss_coef != 0 on a Mixture-of-Experts model); "
                        "set router_aux_loss_coef=0")
    if shim.rollout_correction(trainer) and loss_type not in REFUSED_LOSS_TYPES:
        problems += _rollout_problems(args)
    return problems


def _rollout_problems(args) -> List[str]:
    mode, level = args.vllm_importance_sampling_mode, args.importance_sampling_level
    low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        return [f"vllm_importance_sampling_mode={mode!r}"]
    if mode.startswith("token") and level == "sequence":
        return [f"vllm_importance_sampling_mode={mode!r} with importance_sampling_level='sequence' (TRL's gradient "
                "sees each completion's mean token weight, rlhf_fast's each token's own); use a sequence_* mode"]
    if low is None and high is None:
        return [f"vllm_importance_sampling_mode={mode!r} without vllm_importance_sampling_clip_min or _clip_max "
                "(rlhf_fast's rollout correction needs a bound)"]
    if mode.startswith("sequence") and not (high is not None and high < _SEQUENCE_WEIGHT_CAP):
        return [f"vllm_importance_sampling_mode={mode!r} with vllm_importance_sampling_clip_max={high} (TRL weights a "
                "sequence by exp(Σ log-ratio) with no bound; rlhf_fast caps Σ at 20, so the two differ for a weight "
                f"above e^20 ≈ 4.85e8); set vllm_importance_sampling_clip_max below {_SEQUENCE_WEIGHT_CAP:.2g} "
                "(TRL's default is 3.0)"]
    return []


def loss_options(trainer, entropy_coef: float = 0.0) -> LossOptions:
    """The rlhf_fast loss options of a ``GRPOTrainer``'s configuration (per-token math; see the module doc)."""
    args = trainer.args
    record = LOSS_TYPES[args.loss_type]
    policy = record.policy
    fields = dict(
        kl_coef=float(args.beta), kl_estimator="k3", kl_ratio_weighted=bool(args.beta != 0.0 and
                                                                          args.use_bias_correction_kl),
        entropy_coef=float(entropy_coef), temperature=float(args.temperature), loss_agg=record.aggregation,
        rollout_is_max=None, policy_loss=policy.variant(args.importance_sampling_level), **policy.options(args),
    )
    if record.norm_length is not None:
        fields["norm_length"] = float(getattr(args, record.norm_length))
    if shim.rollout_correction(trainer):
        mode = args.vllm_importance_sampling_mode
        fields.update(rollout_is="truncate" if mode.endswith("truncate") else "mask",
                      rollout_is_level="sequence" if mode.startswith("sequence") else "token",
                      rollout_is_min=args.vllm_importance_sampling_clip_min,
                      rollout_is_max=args.vllm_importance_sampling_clip_max)
    return LossOptions(**fields)


# ----------------------------------------------------------------------------------
# Equipping a trainer
# ----------------------------------------------------------------------------------


def equip(trainer: GRPOTrainer, *, backend: str = "auto", chunk_size: Optional[int] = None,
          verify_head="auto") -> GRPOTrainer:
    """Make ``trainer`` compute its loss with rlhf_fast (returns it); raises ``ValueError`` for what it cannot honour.

    ``backend`` is the row backend of the fused-linear loss (``"auto"``: Triton on CUDA, C++ on
    CPU); ``chunk_size`` the tokens per chunk (None: automatic). ``verify_head``: see
    :func:`rlhf_fast.integrations.transformers.lm_head` (one three-token forward of the model).
    A TRL other than the one :mod:`~rlhf_fast.integrations.trl_shim` is written for warns.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise ValueError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    shim.check(trainer)
    problems = unsupported(trainer)
    if problems:
        raise ValueError("rlhf_fast cannot reproduce TRL's loss for this GRPOConfig:\n  - " + "\n  - ".join(problems))
    try:
        head = lm_head(trainer.model, verify=verify_head, trust_head_forward=bool(trainer.args.cast_lm_head_to_fp32))
    except UnsupportedModelError as exc:
        raise ValueError(f"rlhf_fast cannot score this model: {exc}") from exc
    trainer._rlhf_fast = Setup(loss_options(trainer), LOSS_TYPES[trainer.args.loss_type], head.logit_scale,
                               head.logit_softcap, backend, chunk_size)
    shim.install(trainer, compute_loss)
    return trainer


class RLHFFastGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is rlhf_fast's fused-linear loss (the same arguments, plus two).

    ``rlhf_fast_backend`` and ``rlhf_fast_chunk_size``: the row backend and tokens per chunk
    (see :func:`equip`). A configuration rlhf_fast cannot reproduce raises ``ValueError`` here.
    """

    def __init__(self, *args, rlhf_fast_backend: str = "auto", rlhf_fast_chunk_size: Optional[int] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        equip(self, backend=rlhf_fast_backend, chunk_size=rlhf_fast_chunk_size)
