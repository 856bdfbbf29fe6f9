"""Parity with the policy losses of TRL and verl, run through the peers' own code.

The same inputs go through a peer's loss and through ``rf.ppo_loss`` with the options that
:func:`trl_options` / :func:`verl_options` map the peer's configuration to (the table in
docs/peers.md); the loss and d(loss)/d(logits) must agree in fp32 to rtol 1e-5, atol 1e-6 (the
contract's fp32 tolerance), on the eager reference and on the C++ backend.

* TRL (``trl==1.16.0``): ``GRPOTrainer._compute_loss`` on a trainer built without ``__init__``
  (no model, dataset or accelerator): the attributes ``_compute_loss`` reads, set from a real
  ``GRPOConfig`` the way ``__init__`` sets them, and the model forward replaced by TRL's own
  ``selective_log_softmax_and_entropy`` on the test's logits. TRL computes the vLLM
  importance-sampling ratio inside generation (which needs a model and vLLM); the test builds
  it from the definition in ``GRPOConfig``'s help (the ratio exp(old − sampling) per token, or
  exp(Σ) per sequence, truncated or masked to [min, max]) and hands it to ``_compute_loss``.
* verl (``verl==0.9.1``): the actor's loss ``verl.workers.utils.losses.ppo_loss`` (its registered
  policy losses, ``kl_penalty``, ``agg_loss``, the entropy bonus) on verl's packed model output
  (remove-padding: prompt and response tokens of every sequence back to back), with the
  rollout-correction weights from the trainer's ``compute_rollout_correction_and_add_to_batch``
  and log-probs / entropy from verl's ``logprobs_from_logits`` / ``entropy_from_logits``. Ours
  runs twice: padded ``[B, T]`` and packed (``cu_seqlens``) on the same logits.

A peer setting that the options cannot express raises :class:`NotExpressible`; each such
convention difference has a test stating it exactly (``test_*_difference_*``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple, Optional

import pytest
import torch
from conftest import HAS_CPP
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import selective_log_softmax_and_entropy
from verl import DataProto
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.utils import tensordict_utils as verl_td
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss as verl_actor_loss

import rlhf_fast as rf

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # GRPOConfig

RTOL, ATOL = 1e-5, 1e-6  # the contract's fp32 tolerance
SEQUENCE_WEIGHT_CAP = 4.8e8  # e^20 less 1%: below it, ours (Σ log-ratio capped at 20) and TRL (uncapped) agree
BACKENDS = ["eager"] + (["cpp"] if HAS_CPP else [])
V = 29


class NotExpressible(ValueError):
    """A peer setting with no exact counterpart in the loss options (docs/peers.md says why)."""


def _grad(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def assert_parity(ours, ours_grad, peer, peer_grad, what: str = "") -> None:
    torch.testing.assert_close(ours.detach(), peer.detach().to(ours.dtype), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"loss {what}: {m}")
    torch.testing.assert_close(ours_grad, peer_grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"d(logits) {what}: {m}")
    assert ours_grad.abs().max() > 0, f"{what}: no gradient at all (a vacuous comparison)"


# ======================================================================================
# TRL: GRPOTrainer._compute_loss
# ======================================================================================

TRL_B, TRL_T = 4, 6
TRL_LENGTHS = (6, 4, 1, 5)  # completion tokens per row (right-padded); row 2 is a one-token completion
TRL_ADVANTAGES = (0.9, -0.6, 0.5, -1.2)  # one per completion, as GRPO computes them


def trl_config(**kwargs) -> GRPOConfig:
    """A real GRPOConfig on CPU (bf16 off), everything else TRL's defaults unless given."""
    return GRPOConfig(output_dir="unused-trl-output", report_to="none", bf16=False, use_cpu=True, **kwargs)


def trl_options(args: GRPOConfig, num_items_in_batch: Optional[float] = None, local_tokens: Optional[float] = None,
                importance_sampling: bool = False) -> dict:
    """``rf.ppo_loss`` keyword options equal to TRL's ``_compute_loss`` under ``args`` (docs/peers.md)."""
    loss_type, sequence = args.loss_type, args.importance_sampling_level == "sequence"
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    options: dict = {"temperature": args.temperature}
    if loss_type in ("grpo", "sapo"):
        options["loss_agg"] = "seq-mean-token-mean"  # over rows with a token: see the grpo difference test
    elif loss_type == "bnpo":
        options["loss_agg"] = "token-mean"
    elif loss_type == "dr_grpo":
        options.update(loss_agg="seq-mean-token-sum-norm", norm_length=float(args.max_completion_length))
    elif loss_type in ("dapo", "cispo"):
        # TRL divides by num_items_in_batch / num_processes * grad_accum / steps_per_generation (1 process here)
        scale = args.gradient_accumulation_steps / args.steps_per_generation
        options.update(loss_agg="token-mean", global_num_tokens=float(num_items_in_batch) * scale)
    else:
        raise NotExpressible(f"loss_type={loss_type!r}")
    if loss_type == "cispo":
        if eps_high <= 1.0:
            raise NotExpressible("cispo with epsilon_high <= 1 caps every ratio below 1")
        options.update(policy_loss="cispo", clip_eps=1.0, clip_eps_high=eps_high - 1.0)  # clamp(r, 0, ε_high)
    elif loss_type == "sapo":
        options.update(policy_loss="sapo", sapo_tau_pos=args.sapo_temperature_pos,
                       sapo_tau_neg=args.sapo_temperature_neg)
    else:
        options.update(clip_eps=eps_low, clip_eps_high=eps_high)
        if args.delta is not None:  # TRL caps r at δ before the min, for both signs of A
            if args.delta <= 1.0:
                raise NotExpressible("delta <= 1 caps every ratio below 1")
            # δ > 1 + ε_high: the dual clip at δ. 1 < δ ≤ 1 + ε_high: A > 0 is clipped at δ, and A < 0 with
            # r > 1 + ε_high gets −A·(1 + ε_high): an upper clip at δ and the dual clip at 1 + ε_high.
            options.update(clip_eps_high=min(eps_high, args.delta - 1.0), dual_clip=max(args.delta, 1.0 + eps_high))
    if sequence:
        if loss_type in ("cispo", "sapo"):
            raise NotExpressible(f"importance_sampling_level='sequence' with {loss_type!r}")
        options["policy_loss"] = "gspo"
    if args.beta != 0.0:
        if sequence and args.use_bias_correction_kl:
            raise NotExpressible("the sequence ratio weighting the KL (and spreading its gradient)")
        options.update(kl_coef=args.beta, kl_estimator="k3", kl_ratio_weighted=args.use_bias_correction_kl)
    if args.entropy_coef != 0.0:
        token_mean = options["loss_agg"] == "token-mean" and options.get("global_num_tokens", local_tokens) == \
            local_tokens
        if not token_mean or args.use_adaptive_entropy:
            raise NotExpressible("TRL's entropy bonus is a local token mean whatever the loss_type")
        options["entropy_coef"] = args.entropy_coef
    if args.top_entropy_quantile < 1.0 or args.off_policy_mask_threshold is not None:
        raise NotExpressible("top_entropy_quantile / off_policy_mask_threshold edit the mask")
    if importance_sampling and args.use_vllm and args.vllm_importance_sampling_correction:
        constraint_level = {"token_truncate": ("truncate", "token"), "token_mask": ("mask", "token"),
                            "sequence_truncate": ("truncate", "sequence"), "sequence_mask": ("mask", "sequence")}
        mode, level = constraint_level[args.vllm_importance_sampling_mode]
        if sequence and level == "token":
            raise NotExpressible("token-level rollout weights on the sequence ratio (TRL spreads them)")
        high = args.vllm_importance_sampling_clip_max
        if level == "sequence" and (high is None or high >= SEQUENCE_WEIGHT_CAP):
            raise NotExpressible("a sequence weight above e^20 (ours caps Σ log-ratio at 20, TRL does not)")
        options.update(rollout_is=mode, rollout_is_level=level, rollout_is_min=args.vllm_importance_sampling_clip_min,
                       rollout_is_max=args.vllm_importance_sampling_clip_max)
    return options


class TrlCase(NamedTuple):
    logits: torch.Tensor  # [B, T, V] leaf
    targets: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] int (TRL's completion_mask)
    advantages: torch.Tensor  # [B]
    old: torch.Tensor
    ref: torch.Tensor
    sampling: torch.Tensor  # the inference engine's log-probs


def trl_case(seed: int = 0, empty_row: bool = False) -> TrlCase:
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(TRL_B, TRL_T, V, generator=gen)).requires_grad_()
    targets = torch.randint(0, V, (TRL_B, TRL_T), generator=gen)
    mask = (torch.arange(TRL_T) < torch.tensor(TRL_LENGTHS)[:, None]).int()
    if empty_row:
        mask[2] = 0
    lp = torch.log_softmax(logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1)
    log_ratio = 0.3 * torch.randn(TRL_B, TRL_T, generator=gen)
    log_ratio[0, 1], log_ratio[1, 2], log_ratio[3, 0], log_ratio[1, 0] = 1.5, 1.4, 1.3, -0.7  # beyond 3 and 0.8
    old = lp - log_ratio
    ref = lp + 0.3 * torch.randn(TRL_B, TRL_T, generator=gen)
    mismatch = 0.3 * torch.randn(TRL_B, TRL_T, generator=gen)
    mismatch[0, 2], mismatch[3, 1] = 1.2, -1.0
    return TrlCase(logits, targets, mask, torch.tensor(TRL_ADVANTAGES), old, ref, old - mismatch)


class _Accelerator:
    """What ``_compute_loss`` asks of accelerate, for one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_trainer(args: GRPOConfig, case: TrlCase) -> GRPOTrainer:
    """A GRPOTrainer without ``__init__``: the attributes ``_compute_loss`` reads, set from ``args`` as
    ``__init__`` sets them; the model forward is TRL's log-prob/entropy helper on the case's logits."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.args = args
    for name in ("loss_type", "beta", "importance_sampling_level", "off_policy_mask_threshold", "top_entropy_quantile",
                 "entropy_coef", "use_adaptive_entropy", "max_completion_length", "use_vllm",
                 "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
        setattr(trainer, name, getattr(args, name))
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    trainer.aux_loss_enabled = False
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.model = torch.nn.Module()  # .training is True: train mode
    trainer.accelerator = _Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def forward(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == case.targets.shape[1]
        lp, entropy = selective_log_softmax_and_entropy(case.logits, case.targets, temperature=args.temperature)
        return lp, entropy, None

    trainer._get_per_token_logps_and_entropies = forward
    return trainer


def trl_importance_ratio(args: GRPOConfig, case: TrlCase) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio ([B, T] per token, [B, 1] per sequence), as GRPOConfig defines it."""
    diff = (case.old - case.sampling) * case.mask
    if args.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if args.vllm_importance_sampling_mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    outside = (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))
    return ratio.masked_fill(outside, 0.0)


def run_trl(args: GRPOConfig, case: TrlCase, on_policy: bool = False, num_items_in_batch=None):
    """TRL's loss and d(loss)/d(logits)."""
    inputs = {
        "prompt_ids": torch.zeros(TRL_B, 1, dtype=torch.long), "prompt_mask": torch.ones(TRL_B, 1, dtype=torch.long),
        "completion_ids": case.targets, "completion_mask": case.mask, "advantages": case.advantages,
    }
    if not on_policy:
        inputs["old_per_token_logps"] = case.old
    if args.beta != 0.0:
        inputs["ref_per_token_logps"] = case.ref
    if args.use_vllm and args.vllm_importance_sampling_correction:
        inputs["importance_sampling_ratio"] = trl_importance_ratio(args, case)
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch))
    loss = trl_trainer(args, case)._compute_loss(None, inputs)
    return loss, _grad(loss, case.logits)


def run_ours_trl(case: TrlCase, backend: str, on_policy: bool = False, **options):
    out = rf.ppo_loss(case.logits, case.targets, case.advantages, None if on_policy else case.old,
                      case.ref if options.get("kl_coef") else None, case.mask.bool(),
                      rollout_logprobs=case.sampling if options.get("rollout_is", "none") != "none" else None,
                      backend=backend, **options)
    return out.loss, _grad(out.loss, case.logits)


# (id, GRPOConfig keywords, on-policy); num_items_in_batch for dapo / cispo is twice the local tokens
# (as if another micro-batch shared the normaliser).
TRL_CONFIGS = [
    ("grpo", dict(loss_type="grpo"), False),
    ("grpo-clip-higher", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28), False),
    ("grpo-beta-biascorr", dict(loss_type="grpo", beta=0.04), False),
    ("grpo-beta-nobiascorr", dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False), False),
    ("grpo-beta-biascorr-onpolicy", dict(loss_type="grpo", beta=0.04), True),
    ("grpo-delta", dict(loss_type="grpo", epsilon_high=0.28, delta=3.0), False),
    ("bnpo-delta-inside-clip-range", dict(loss_type="bnpo", epsilon_high=0.28, delta=1.1), False),
    ("grpo-delta-at-clip-bound", dict(loss_type="grpo", epsilon_high=0.5, delta=1.5), False),
    ("bnpo", dict(loss_type="bnpo", epsilon=0.15, epsilon_high=0.3), False),
    ("bnpo-entropy", dict(loss_type="bnpo", entropy_coef=0.01, beta=0.02), False),
    ("dr_grpo", dict(loss_type="dr_grpo", max_completion_length=10), False),
    ("dapo", dict(loss_type="dapo", epsilon_high=0.28), False),
    ("dapo-delta-beta", dict(loss_type="dapo", epsilon_high=0.28, delta=2.5, beta=0.1), False),
    ("cispo", dict(loss_type="cispo", epsilon_high=5.0), False),
    ("cispo-binding-cap", dict(loss_type="cispo", epsilon_high=1.3), False),
    ("sapo", dict(loss_type="sapo"), False),
    ("sapo-temperatures", dict(loss_type="sapo", sapo_temperature_pos=1.5, sapo_temperature_neg=2.0), False),
    ("gspo", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4), False),
    ("gspo-wide-delta", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.28, delta=1.5),
     False),
    ("gspo-dr_grpo", dict(loss_type="dr_grpo", importance_sampling_level="sequence", max_completion_length=8), False),
    ("gspo-beta-nobiascorr", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                                  use_bias_correction_kl=False), False),
    ("vllm-token-truncate", dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                                 vllm_importance_sampling_clip_max=2.0), False),
    ("vllm-token-mask", dict(loss_type="bnpo", use_vllm=True, vllm_importance_sampling_mode="token_mask",
                             vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0), False),
    ("vllm-sequence-truncate", dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_mode="sequence_truncate",
                                    vllm_importance_sampling_clip_min=0.6, vllm_importance_sampling_clip_max=1.5),
     False),
    ("vllm-sequence-mask", dict(loss_type="dapo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask",
                                vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=3.0), False),
    ("gspo-vllm-sequence-mask", dict(loss_type="grpo", importance_sampling_level="sequence", use_vllm=True,
                                     vllm_importance_sampling_mode="sequence_mask",
                                     vllm_importance_sampling_clip_max=3.0), False),
    ("temperature", dict(loss_type="grpo", temperature=0.7, beta=0.04), False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config,on_policy", TRL_CONFIGS, ids=[c[0] for c in TRL_CONFIGS])
def test_trl_parity(name, config, on_policy, backend):
    case = trl_case(seed=len(name))
    args = trl_config(**config)
    local = float(case.mask.sum())
    items = 2 * local if args.loss_type in ("dapo", "cispo") else None
    options = trl_options(args, num_items_in_batch=items, local_tokens=local, importance_sampling=True)
    peer, peer_grad = run_trl(args, case, on_policy=on_policy, num_items_in_batch=items)
    ours, ours_grad = run_ours_trl(case, backend, on_policy=on_policy, **options)
    assert_parity(ours, ours_grad, peer, peer_grad, f"TRL {name} {options}")


def test_trl_config_is_exercised():
    """The parity cases reach what they claim: clipped, dual-clipped, truncated and masked tokens."""
    case = trl_case(seed=3)
    lp = torch.log_softmax(case.logits.detach(), -1).gather(-1, case.targets[..., None]).squeeze(-1)
    ratio, valid = torch.exp(lp - case.old), case.mask.bool()
    adv = case.advantages[:, None].expand_as(ratio)
    assert ((adv > 0) & (ratio > 1.28) & valid).any() and ((adv < 0) & (ratio < 0.8) & valid).any()
    assert ((adv < 0) & (ratio > 3.0) & valid).any()  # dual clip / delta
    rho = torch.exp(case.old - case.sampling)
    assert ((rho > 2.0) & valid).any() and ((rho < 0.5) & valid).any()


def test_trl_grpo_counts_empty_rows_with_global_num_sequences():
    """TRL's grpo / sapo average over all B rows, a row without tokens adding 0; seq-mean-token-mean
    averages over the B_valid rows that have a token (TRL = ours · B_valid / B), unless
    global_num_sequences = B, which gives TRL's convention exactly."""
    case = trl_case(seed=5, empty_row=True)
    args = trl_config(loss_type="grpo", beta=0.04)
    peer, peer_grad = run_trl(args, case)
    ours, ours_grad = run_ours_trl(case, "eager", **trl_options(args))
    scale = 3 / 4  # rows with a token / rows
    assert_parity(ours * scale, ours_grad * scale, peer, peer_grad, "grpo with an empty row")
    assert not torch.allclose(ours, peer, rtol=1e-3)
    exact, exact_grad = run_ours_trl(case, "eager", global_num_sequences=TRL_B, **trl_options(args))
    assert_parity(exact, exact_grad, peer, peer_grad, "grpo with an empty row, global_num_sequences = B")


def test_trl_difference_entropy_is_a_token_mean():
    """TRL's entropy bonus is the local token mean of H for every loss_type; ours aggregates η·H like the
    rest of the loss. So TRL(grpo, η) = ours(grpo, η = 0) + ours(token-mean, A = 0, η)."""
    case = trl_case(seed=6)
    args = trl_config(loss_type="grpo", entropy_coef=0.05)
    with pytest.raises(NotExpressible):
        trl_options(args, local_tokens=float(case.mask.sum()))
    peer, peer_grad = run_trl(args, case)
    policy, policy_grad = run_ours_trl(case, "eager", **trl_options(trl_config(loss_type="grpo")))
    bonus = rf.ppo_loss(case.logits, case.targets, torch.zeros(TRL_B), case.old, mask=case.mask.bool(),
                        entropy_coef=0.05, backend="eager").loss
    assert_parity(policy + bonus, policy_grad + _grad(bonus, case.logits), peer, peer_grad, "grpo entropy bonus")


def test_trl_difference_sequence_level_bias_corrected_kl():
    """importance_sampling_level='sequence' with use_bias_correction_kl: TRL weights each token's KL by
    the sequence ratio s_b (value 1 on-policy) and so spreads Σ_t kl_t's gradient over the sequence:
    d/dlp_u gains (Σ_{t∈b} kl_t)/|b| (per-row weights of grpo). kl_ratio_weighted uses the token ratio r_u,
    whose gradient stays on u: d/dlp_u gains kl_u. Values agree; the gradients differ by exactly that."""
    case = trl_case(seed=8)
    args = trl_config(loss_type="grpo", importance_sampling_level="sequence", beta=0.04)
    with pytest.raises(NotExpressible):
        trl_options(args)
    peer, peer_grad = run_trl(args, case, on_policy=True)
    ours, ours_grad = run_ours_trl(case, "eager", on_policy=True, loss_agg="seq-mean-token-mean", policy_loss="gspo",
                                   kl_coef=0.04, kl_ratio_weighted=True)
    torch.testing.assert_close(ours, peer, rtol=RTOL, atol=ATOL)
    lp = rf.logprobs(case.logits, case.targets, case.mask.bool())
    valid = case.mask.bool()
    delta = case.ref - lp.detach()
    kl = torch.where(valid, torch.exp(delta) - delta - 1.0, torch.zeros_like(delta))
    count = valid.sum(-1, keepdim=True)
    weight = 0.04 / (count * TRL_B)  # β times grpo's per-token weight, rows that have tokens
    spread = (kl.sum(-1, keepdim=True) / count).expand_as(kl)
    correction = (weight * torch.where(valid, (spread - kl) * lp, torch.zeros_like(lp))).sum()
    torch.testing.assert_close(ours_grad + _grad(correction, case.logits), peer_grad, rtol=RTOL, atol=ATOL)
    assert (ours_grad - peer_grad).abs().max() > 1e-4


def test_trl_difference_sequence_level_with_token_weights():
    """importance_sampling_level='sequence' with token-level vLLM weights w_t: TRL multiplies the sequence
    term by w_t, so its gradient spreads Σ_t w_t over the sequence; ours keeps w_t on token t. With a
    weight constant over each row's tokens (grpo / bnpo / dr_grpo / dapo weights are) TRL equals ours with
    every token's weight replaced by its row's mean weight w̄_b (here: a per-sequence weight w̄_b)."""
    case = trl_case(seed=9)
    args = trl_config(loss_type="grpo", importance_sampling_level="sequence", use_vllm=True,
                      vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0)
    with pytest.raises(NotExpressible):
        trl_options(args, importance_sampling=True)
    peer, peer_grad = run_trl(args, case)
    valid = case.mask.bool()
    weights = trl_importance_ratio(args, case)
    mean_weight = (weights * valid).sum(-1) / valid.sum(-1)
    # rollout log-probs whose sequence-level weight is w̄_b (carried by each row's first token)
    sampling = case.old.clone()
    sampling[:, 0] = case.old[:, 0] - torch.log(mean_weight)
    ours_case = case._replace(sampling=sampling)
    options = dict(trl_options(trl_config(loss_type="grpo", importance_sampling_level="sequence")),
                   rollout_is="truncate", rollout_is_level="sequence", rollout_is_max=1e6)
    ours, ours_grad = run_ours_trl(ours_case, "eager", **options)
    assert_parity(ours, ours_grad, peer, peer_grad, "gspo with token weights")


def _far_off_sequences(seed: int) -> TrlCase:
    """Rows 0 and 1 with Σ(old − sampling) = +24 and −24: sequence weights e^±24, beyond our cap of e^±20."""
    case = trl_case(seed=seed)
    sampling = case.old.clone()
    for row, total in ((0, 24.0), (1, -24.0)):
        n = int(case.mask[row].sum())
        sampling[row, :n] = case.old[row, :n] - total / n
    return case._replace(sampling=sampling)


@pytest.mark.parametrize("mode", ["sequence_mask", "sequence_truncate"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_sequence_weights_far_off_policy_with_a_bound_below_e20(mode, backend):
    """Σ log-ratio = ±24 (ours caps it at ±20, TRL does not): with vllm_importance_sampling_clip_max below
    e^20 row 0's weight is truncated to the bound or masked in both; row 1's e^-24 (TRL) and e^-20 (ours)
    differ by 2e-9 of the row's policy term, inside the fp32 tolerance."""
    case = _far_off_sequences(seed=10)
    args = trl_config(loss_type="dapo", use_vllm=True, vllm_importance_sampling_mode=mode,
                      vllm_importance_sampling_clip_max=1e8)
    items = 2 * float(case.mask.sum())
    options = trl_options(args, num_items_in_batch=items, local_tokens=items / 2, importance_sampling=True)
    peer, peer_grad = run_trl(args, case, num_items_in_batch=items)
    ours, ours_grad = run_ours_trl(case, backend, **options)
    assert_parity(ours, ours_grad, peer, peer_grad, f"{mode} far off policy")


def test_trl_difference_sequence_weight_without_an_upper_bound():
    """vllm_importance_sampling_clip_max=None with a sequence_* mode: TRL weights a sequence by e^Σ whatever Σ;
    ours caps Σ at 20. With only row 0 (Σ = 24) carrying an advantage, TRL's loss is e^4 times ours: the
    integration refuses this configuration (test_integrations)."""
    case = _far_off_sequences(seed=11)._replace(advantages=torch.tensor([0.9, 0.0, 0.0, 0.0]))
    args = trl_config(loss_type="dapo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask",
                      vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=None)
    items = float(case.mask.sum())
    with pytest.raises(NotExpressible):
        trl_options(args, num_items_in_batch=items, local_tokens=items, importance_sampling=True)
    peer, _ = run_trl(args, case, num_items_in_batch=items)
    ours, _ = run_ours_trl(case, "eager", loss_agg="token-mean", rollout_is="mask", rollout_is_level="sequence",
                           rollout_is_min=0.5, rollout_is_max=None)
    torch.testing.assert_close(peer / ours, torch.tensor(math.exp(4.0)), rtol=1e-4, atol=0.0)


# ======================================================================================
# verl: the actor loss (verl.workers.utils.losses.ppo_loss) on packed model output
# ======================================================================================

VERL_PROMPTS = (2, 1, 3, 1)  # prompt tokens per sequence
VERL_RESPONSES = (6, 3, 1, 5)  # response tokens per sequence; padded response length R = 6
VERL_B, VERL_P, VERL_R = 4, 3, 6


class VerlCase(NamedTuple):
    logits: torch.Tensor  # [nnz, V] leaf: the packed model output (prompt + response tokens, no padding)
    next_tokens: torch.Tensor  # [nnz] the token each packed row scores (the input shifted by one)
    rows: torch.Tensor  # [B, R] packed row of each response token (0 past the response)
    response: torch.Tensor  # [B, R] bool: inside the response
    mask: torch.Tensor  # [B, R] bool: response_mask
    attention_mask: torch.Tensor  # [B, P + R]
    cu_seqlens: torch.Tensor  # [B + 1]
    advantages: torch.Tensor  # [B, R] per token
    old: torch.Tensor
    ref: torch.Tensor
    rollout: torch.Tensor


def verl_case(seed: int = 0, temperature: float = 1.0, empty_row: bool = False) -> VerlCase:
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = torch.tensor(VERL_PROMPTS), torch.tensor(VERL_RESPONSES)
    lengths = prompts + responses
    nnz = int(lengths.sum())
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    logits = (2.0 * torch.randn(nnz, V, generator=gen)).requires_grad_()
    tokens = torch.randint(0, V, (nnz,), generator=gen)
    next_tokens = torch.roll(tokens, -1)
    j = torch.arange(VERL_R)
    response = j < responses[:, None]
    # the log-prob of response token j of sequence b sits on the packed row just before it
    rows = torch.where(response, cu_seqlens[:-1, None] + prompts[:, None] - 1 + j, torch.zeros((), dtype=torch.long))
    attention_mask = torch.zeros(VERL_B, VERL_P + VERL_R, dtype=torch.long)
    for b in range(VERL_B):
        attention_mask[b, VERL_P - VERL_PROMPTS[b]:VERL_P + VERL_RESPONSES[b]] = 1  # left-padded prompt
    mask = response.clone()
    if empty_row:
        mask[2] = False
    lp = torch.log_softmax(logits.detach() / temperature, -1).gather(-1, next_tokens[:, None]).squeeze(-1)[rows]
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    advantages = sign * (0.1 + torch.rand(VERL_B, VERL_R, generator=gen))
    log_ratio = 0.3 * torch.randn(VERL_B, VERL_R, generator=gen)
    log_ratio[0, 1], log_ratio[1, 1], log_ratio[3, 2], log_ratio[1, 0] = 1.5, 1.4, 1.25, -0.7
    old = lp - log_ratio
    delta = 0.4 * torch.randn(VERL_B, VERL_R, generator=gen)
    delta[0, 4], delta[3, 3] = 3.0, -12.0  # k3 = 16.1 and 11.0: beyond verl's KL clamp at 10
    ref = lp + delta
    mismatch = 0.3 * torch.randn(VERL_B, VERL_R, generator=gen)
    mismatch[0, 2], mismatch[3, 1] = 1.2, -1.0
    zero = torch.zeros(())
    pad = lambda t: torch.where(response, t, zero)  # noqa: E731  (verl's padded frame holds 0 past the response)
    return VerlCase(logits, next_tokens, rows, response, mask, attention_mask, cu_seqlens, pad(advantages), pad(old),
                    pad(ref), pad(old - mismatch))


def verl_actor(loss_mode: str = "vanilla", **kwargs) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode), **kwargs)


def verl_options(actor: ActorConfig, rollout_correction: Optional[RolloutCorrectionConfig] = None,
                 batch_num_tokens: Optional[float] = None, temperature: float = 1.0) -> dict:
    """``rf.ppo_loss`` keyword options equal to verl's actor loss under ``actor`` (docs/peers.md), for one
    micro-batch that is the whole mini-batch (global_batch_size = B) on one data-parallel rank."""
    mode = actor.policy_loss.get("loss_mode", "vanilla")
    low = actor.clip_ratio_low if actor.clip_ratio_low is not None else actor.clip_ratio
    high = actor.clip_ratio_high if actor.clip_ratio_high is not None else actor.clip_ratio
    options: dict = {"temperature": temperature, "loss_agg": actor.loss_agg_mode}
    if mode == "vanilla":
        options.update(clip_eps=low, clip_eps_high=high, dual_clip=actor.clip_ratio_c, log_ratio_clamp=20.0)
    elif mode == "gspo":  # verl clamps log s_b at +10 only
        options.update(policy_loss="gspo", clip_eps=low, clip_eps_high=high, log_ratio_clamp=10.0)
    elif mode == "cispo":
        options.update(policy_loss="cispo", clip_eps=low, clip_eps_high=high, log_ratio_clamp=20.0)
    elif mode == "sapo":
        # verl's sapo aggregates its policy term with seq-mean-token-mean whatever loss_agg_mode says
        if actor.loss_agg_mode != "seq-mean-token-mean" and (actor.entropy_coeff != 0 or actor.use_kl_loss):
            raise NotExpressible("sapo's policy term and its entropy / KL terms use different aggregations")
        options.update(policy_loss="sapo", sapo_tau_pos=actor.tau_pos, sapo_tau_neg=actor.tau_neg,
                       log_ratio_clamp=20.0, loss_agg="seq-mean-token-mean")
    else:
        raise NotExpressible(f"loss_mode={mode!r}")
    if options["loss_agg"] == "token-sum":
        options.update(loss_agg="token-mean", global_num_tokens=1.0)
    elif options["loss_agg"] == "token-mean" and batch_num_tokens is not None:
        options["global_num_tokens"] = float(batch_num_tokens)
    elif options["loss_agg"] == "seq-mean-token-sum-norm" and actor.loss_scale_factor is not None:
        options["norm_length"] = float(actor.loss_scale_factor)
    if actor.entropy_coeff != 0:
        options["entropy_coef"] = actor.entropy_coeff
    if actor.use_kl_loss:
        estimators = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "k2+": "k2", "low_var_kl": "k3", "k3": "k3",
                      "low_var_kl+": "k3+", "k3+": "k3+"}
        if actor.kl_loss_type not in estimators:
            raise NotExpressible(f"kl_loss_type={actor.kl_loss_type!r}")
        estimator = estimators[actor.kl_loss_type]
        options.update(kl_coef=actor.kl_loss_coef, kl_estimator=estimator)
        if estimator in ("k3", "k3+"):
            options["kl_clamp"] = 10.0
    if rollout_correction is not None:
        if rollout_correction.rollout_rs is not None or rollout_correction.rollout_is_batch_normalize:
            raise NotExpressible("rollout_rs edits the mask; rollout_is_batch_normalize rescales by a batch mean")
        if rollout_correction.bypass_mode:
            raise NotExpressible("bypass_mode")
        if rollout_correction.rollout_is is not None:
            threshold = rollout_correction.rollout_is_threshold
            if isinstance(threshold, str) and "_" in threshold:
                lower, upper = (float(x) for x in threshold.split("_", 1))
                options.update(rollout_is="mask", rollout_is_min=lower, rollout_is_max=upper)
            else:
                options.update(rollout_is="truncate", rollout_is_min=None, rollout_is_max=float(threshold))
            options["rollout_is_level"] = rollout_correction.rollout_is
    return options


def run_verl(actor: ActorConfig, case: VerlCase, rollout_correction=None, temperature: float = 1.0,
             batch_num_tokens=None, global_batch_size=VERL_B):
    """verl's actor loss and d(loss)/d(packed logits)."""
    scaled = case.logits / temperature
    model_output = {"log_probs": logprobs_from_logits(scaled, case.next_tokens)}
    if actor.entropy_coeff != 0:
        model_output["entropy"] = entropy_from_logits(scaled)
    mask = case.mask.float()
    tensors = {"prompts": torch.zeros(VERL_B, VERL_P, dtype=torch.long),
               "responses": torch.zeros(VERL_B, VERL_R, dtype=torch.long), "attention_mask": case.attention_mask,
               "response_mask": mask, "old_log_probs": case.old, "advantages": case.advantages,
               "ref_log_prob": case.ref}
    if rollout_correction is not None:
        batch = DataProto.from_dict(tensors={"old_log_probs": case.old, "rollout_log_probs": case.rollout,
                                             "response_mask": mask})
        batch, _ = compute_rollout_correction_and_add_to_batch(batch, rollout_correction)
        assert torch.equal(batch.batch["response_mask"], mask)  # no rejection sampling
        if "rollout_is_weights" in batch.batch.keys():
            tensors["rollout_is_weights"] = batch.batch["rollout_is_weights"]
    tokens = float(mask.sum()) if batch_num_tokens is None else batch_num_tokens
    data = verl_td.get_tensordict(tensors, {"dp_size": 1, "batch_num_tokens": tokens,
                                            "global_batch_size": global_batch_size})
    loss, _ = verl_actor_loss(actor, model_output, data)
    return loss, _grad(loss, case.logits)


def run_ours_verl(case: VerlCase, backend: str, packed: bool, **options):
    """Ours on the same packed logits: padded [B, R] (gathered rows) or packed with cu_seqlens."""
    uses_rollout = options.get("rollout_is", "none") != "none"
    ref = case.ref if options.get("kl_coef") else None
    if not packed:
        out = rf.ppo_loss(case.logits[case.rows], case.next_tokens[case.rows], case.advantages, case.old, ref,
                          case.mask, rollout_logprobs=case.rollout if uses_rollout else None, backend=backend,
                          **options)
        return out.loss, _grad(out.loss, case.logits)
    n = case.logits.shape[0]
    where = case.rows[case.mask]

    def scatter(t):
        return torch.zeros(n, dtype=t.dtype).index_put((where,), t[case.mask])

    if options.get("loss_agg") == "seq-mean-token-sum-norm":
        options.setdefault("norm_length", float(VERL_R))  # verl: the padded response length
    out = rf.ppo_loss(case.logits, case.next_tokens, scatter(case.advantages), scatter(case.old),
                      scatter(case.ref) if ref is not None else None, scatter(case.mask),
                      rollout_logprobs=scatter(case.rollout) if uses_rollout else None, cu_seqlens=case.cu_seqlens,
                      backend=backend, **options)
    return out.loss, _grad(out.loss, case.logits)


def _rc(level: str, threshold) -> RolloutCorrectionConfig:
    return RolloutCorrectionConfig(rollout_is=level, rollout_is_threshold=threshold)


# (id, loss_mode, ActorConfig keywords, RolloutCorrectionConfig or None, temperature, batch_num_tokens factor)
VERL_CONFIGS = [
    ("vanilla", "vanilla", {}, None, 1.0, None),
    ("vanilla-clip-higher-c10-seqmean", "vanilla",
     dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0, loss_agg_mode="seq-mean-token-mean"), None,
     1.0, None),
    ("vanilla-seq-mean-token-sum", "vanilla", dict(loss_agg_mode="seq-mean-token-sum"), None, 1.0, None),
    ("vanilla-sum-norm", "vanilla", dict(loss_agg_mode="seq-mean-token-sum-norm"), None, 1.0, None),
    ("vanilla-sum-norm-scale16", "vanilla", dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=16),
     None, 1.0, None),
    ("vanilla-token-sum", "vanilla", dict(loss_agg_mode="token-sum"), None, 1.0, None),
    ("vanilla-global-tokens", "vanilla", dict(clip_ratio_c=2.5), None, 1.0, 3.0),
    ("vanilla-entropy-temperature", "vanilla", dict(entropy_coeff=0.01, loss_agg_mode="seq-mean-token-mean"), None,
     0.7, None),
    ("kl-k1", "vanilla", dict(use_kl_loss=True, kl_loss_type="k1", kl_loss_coef=0.05), None, 1.0, None),
    ("kl-k2", "vanilla", dict(use_kl_loss=True, kl_loss_type="k2", kl_loss_coef=0.05), None, 1.0, None),
    ("kl-k3", "vanilla", dict(use_kl_loss=True, kl_loss_type="k3", kl_loss_coef=0.05), None, 1.0, None),
    ("kl-low_var_kl", "vanilla", dict(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05,
                                      loss_agg_mode="seq-mean-token-mean"), None, 1.0, None),
    ("kl-k3+", "vanilla", dict(use_kl_loss=True, kl_loss_type="k3+", kl_loss_coef=0.05), None, 1.0, None),
    ("kl-low_var_kl+", "vanilla", dict(use_kl_loss=True, kl_loss_type="low_var_kl+", kl_loss_coef=0.05,
                                       loss_agg_mode="seq-mean-token-sum-norm"), None, 1.0, None),
    ("gspo", "gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean"), None, 1.0,
     None),
    ("gspo-wide-token-mean", "gspo", dict(clip_ratio_low=0.2, clip_ratio_high=0.28), None, 1.0, None),
    ("cispo", "cispo", dict(clip_ratio_low=0.2, clip_ratio_high=0.28), None, 1.0, None),
    ("cispo-kl-entropy", "cispo", dict(clip_ratio_low=1.0, clip_ratio_high=4.0, entropy_coeff=0.02, use_kl_loss=True,
                                       kl_loss_type="low_var_kl"), None, 1.0, None),
    ("sapo", "sapo", dict(), None, 1.0, None),
    ("sapo-taus-kl", "sapo", dict(tau_pos=1.5, tau_neg=2.0, loss_agg_mode="seq-mean-token-mean", use_kl_loss=True,
                                  kl_loss_type="k2"), None, 1.0, None),
    ("rollout-token-tis", "vanilla", {}, _rc("token", 2.0), 1.0, None),
    ("rollout-token-icepop", "vanilla", {}, _rc("token", "0.5_2.0"), 1.0, None),
    ("rollout-sequence-tis", "vanilla", dict(loss_agg_mode="seq-mean-token-mean"), _rc("sequence", 1.5), 1.0, None),
    ("rollout-sequence-icepop", "vanilla", {}, _rc("sequence", "0.4_2.5"), 1.0, None),
    ("gspo-rollout-token-tis", "gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4,
                                            loss_agg_mode="seq-mean-token-mean"), _rc("token", 1.5), 1.0, None),
    ("cispo-rollout-sequence-icepop", "cispo", {}, _rc("sequence", "0.4_2.5"), 1.0, None),
    ("sapo-rollout-token-tis", "sapo", {}, _rc("token", 1.5), 1.0, None),
]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mode,actor_kwargs,rollout_correction,temperature,tokens_factor", VERL_CONFIGS,
                         ids=[c[0] for c in VERL_CONFIGS])
def test_verl_parity(name, mode, actor_kwargs, rollout_correction, temperature, tokens_factor, backend, layout):
    case = verl_case(seed=len(name), temperature=temperature)
    actor = verl_actor(mode, **actor_kwargs)
    tokens = None if tokens_factor is None else tokens_factor * float(case.mask.sum())
    options = verl_options(actor, rollout_correction, batch_num_tokens=tokens, temperature=temperature)
    peer, peer_grad = run_verl(actor, case, rollout_correction, temperature, batch_num_tokens=tokens)
    ours, ours_grad = run_ours_verl(case, backend, layout == "packed", **options)
    assert_parity(ours, ours_grad, peer, peer_grad, f"verl {name} {layout} {options}")


def test_verl_config_is_exercised():
    """The verl cases reach the clamps they map: k3 beyond 10, dual clip, truncated and masked weights."""
    case = verl_case(seed=4)
    lp = torch.log_softmax(case.logits.detach(), -1).gather(-1, case.next_tokens[:, None]).squeeze(-1)[case.rows]
    ratio, valid, adv = torch.exp(lp - case.old), case.mask, case.advantages
    delta = case.ref - lp
    assert ((torch.exp(delta) - delta - 1 > 10) & valid).sum() == 2
    assert ((adv < 0) & (ratio > 3.0) & valid).any() and ((adv > 0) & (ratio > 1.28) & valid).any()
    rho = torch.exp(case.old - case.rollout)
    assert ((rho > 2.0) & valid).any() and ((rho < 0.5) & valid).any()


def test_verl_global_batch_size_is_global_num_sequences():
    """verl's seq-mean-* modes divide by global_batch_size (the actor passes the mini-batch size: every
    sequence, with or without a token); ours divide seq-mean-token-mean / -sum by B_valid (sequences of the
    call with a token) and seq-mean-token-sum-norm by B, unless global_num_sequences says otherwise: with it
    they are equal. (Without a global_batch_size, agg_loss's own default, verl divides sum-norm by B_valid.)"""
    case = verl_case(seed=11, empty_row=True)
    for agg, global_batch_size, sequences, scale in (("seq-mean-token-mean", VERL_B, None, 3 / 4),
                                                     ("seq-mean-token-mean", VERL_B, VERL_B, 1.0),
                                                     ("seq-mean-token-sum", 6, 6, 1.0),
                                                     ("seq-mean-token-sum-norm", VERL_B, None, 1.0),
                                                     ("seq-mean-token-sum-norm", None, 3, 1.0)):
        actor = verl_actor(loss_agg_mode=agg, use_kl_loss=True, kl_loss_type="k2")
        peer, peer_grad = run_verl(actor, case, global_batch_size=global_batch_size)
        ours, ours_grad = run_ours_verl(case, "eager", False, global_num_sequences=sequences, **verl_options(actor))
        assert_parity(ours * scale, ours_grad * scale, peer, peer_grad,
                      f"{agg} global_batch_size={global_batch_size} global_num_sequences={sequences}")


def test_verl_difference_sapo_aggregation():
    """verl's sapo aggregates its policy term with seq-mean-token-mean whatever loss_agg_mode is, and the
    entropy and KL terms with loss_agg_mode: verl = ours(sapo, seq-mean-token-mean, η = β = 0) +
    ours(A = 0, η, β, loss_agg_mode)."""
    case = verl_case(seed=12)
    actor = verl_actor("sapo", loss_agg_mode="token-mean", entropy_coeff=0.02, use_kl_loss=True, kl_loss_type="k1",
                       kl_loss_coef=0.1)
    with pytest.raises(NotExpressible):
        verl_options(actor)
    peer, peer_grad = run_verl(actor, case)
    policy, policy_grad = run_ours_verl(case, "eager", False, **verl_options(verl_actor("sapo")))
    rest, rest_grad = run_ours_verl(case._replace(advantages=torch.zeros_like(case.advantages)), "eager", False,
                                    loss_agg="token-mean", entropy_coef=0.02, kl_coef=0.1, kl_estimator="k1")
    assert_parity(policy + rest, policy_grad + rest_grad, peer, peer_grad, "sapo with token-mean entropy and KL")


def _gspo_far_off_policy_case(seed: int, mean_log_ratio: float) -> VerlCase:
    case = verl_case(seed=seed)
    lp = torch.log_softmax(case.logits.detach(), -1).gather(-1, case.next_tokens[:, None]).squeeze(-1)[case.rows]
    old = torch.where(case.response, lp - mean_log_ratio, torch.zeros(()))
    return case._replace(old=old, advantages=-case.advantages.abs())  # A < 0: the unclipped branch is taken


def test_verl_gspo_clamp_value():
    """verl's gspo clamps log s_b at +10 (value e^10 beyond); log_ratio_clamp=10 gives the same value."""
    case = _gspo_far_off_policy_case(13, 12.0)
    actor = verl_actor("gspo", loss_agg_mode="seq-mean-token-mean")
    peer, _ = run_verl(actor, case)
    ours = rf.ppo_loss(case.logits[case.rows], case.next_tokens[case.rows], case.advantages, case.old,
                       mask=case.mask, backend="eager", **verl_options(actor)).loss
    torch.testing.assert_close(ours, peer, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_gspo_clamp_gradient(backend):
    """Beyond the clamp (mean log-ratio 12 > 10) verl's gspo ratio is a constant: zero gradient."""
    case = _gspo_far_off_policy_case(13, 12.0)
    actor = verl_actor("gspo", loss_agg_mode="seq-mean-token-mean")
    peer, peer_grad = run_verl(actor, case)
    assert peer_grad.abs().max() == 0
    ours, ours_grad = run_ours_verl(case, backend, False, **verl_options(actor))
    torch.testing.assert_close(ours, peer, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours_grad, peer_grad, rtol=RTOL, atol=ATOL)


def test_verl_not_expressible():
    """verl settings without an exact counterpart are refused by the mapping, not approximated."""
    for actor, rc in ((verl_actor("vanilla", use_kl_loss=True, kl_loss_type="abs"), None),
                      (verl_actor("vanilla", use_kl_loss=True, kl_loss_type="k1+"), None),
                      (verl_actor("clip_cov"), None),
                      (verl_actor("vanilla"), RolloutCorrectionConfig(rollout_is="token", rollout_rs="token_k1",
                                                                      rollout_rs_threshold="0.5_2.0")),
                      (verl_actor("vanilla"), RolloutCorrectionConfig(rollout_is="token",
                                                                      rollout_is_batch_normalize=True))):
        with pytest.raises(NotExpressible):
            verl_options(actor, rc)


def test_trl_not_expressible():
    for config in (dict(loss_type="luspo", importance_sampling_level="sequence"), dict(loss_type="vespo"),
                   dict(loss_type="cispo"),  # epsilon_high defaults to epsilon = 0.2: a cap below 1
                   dict(loss_type="sapo", importance_sampling_level="sequence"),
                   dict(loss_type="grpo", delta=1.0), dict(loss_type="grpo", top_entropy_quantile=0.2),
                   dict(loss_type="grpo", off_policy_mask_threshold=0.5)):
        with pytest.raises(NotExpressible):
            trl_options(trl_config(**config), num_items_in_batch=10.0, local_tokens=10.0)
    for mode in ("sequence_mask", "sequence_truncate"):
        for high in (None, 5e8):
            args = trl_config(loss_type="grpo", use_vllm=True, vllm_importance_sampling_mode=mode,
                              vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=high)
            with pytest.raises(NotExpressible):
                trl_options(args, importance_sampling=True)
