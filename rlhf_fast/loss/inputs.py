"""The arguments every loss entry point shares, and their preparation.

:class:`LossArgs` declares, once, the per-token tensors and call settings that ``rf.ppo_loss``,
``rf.fused_linear_ppo_loss`` and ``rf.logprobs_ppo_loss`` take after their scores; :func:`loss_entry`
writes them into each one's signature and :func:`bind` binds a call's (with the loss options).

Every loss checks and flattens its per-token inputs here, once, into :class:`LossInputs`:
the checks of the contract's "inputs that are refused" section (``ValueError`` naming the
argument), sanitised targets, the valid mask, per-row vectors (constants: detached), the
sequences the per-token math and the aggregation need, and the aggregation weights. The
caller only checks what is its own (the logits tensor, or hidden/weight/bias).

Value checks on device tensors (target range, a {0, 1} mask, ``global_num_tokens``,
``cu_seqlens``) cost one host synchronisation together when ``validate=True``; inside
``torch.compile`` they become asynchronous device assertions.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union, get_type_hints

import torch
import torch.distributed as dist

from ..backends.rows import RowParams
from .aggregation import aggregation_weights
from .options import OPTION_NAMES, LossOptions
from .policy import POLICY_LOSSES, Sequences


class LossInputs(NamedTuple):
    """Validated per-token inputs, flattened to ``N`` rows, as the backends take them."""

    targets: torch.Tensor  # [N] sanitised ids (0 where masked; shard-local or −1 with a process group)
    valid: torch.Tensor  # [N] bool
    shape: torch.Size  # leading shape of the targets
    advantages: torch.Tensor  # [N] fp32 (fp64 for fp64 logits), 0 where masked
    old_logprobs: Optional[torch.Tensor]  # [N] or None
    ref_logprobs: Optional[torch.Tensor]  # [N] or None
    rollout_logprobs: Optional[torch.Tensor]  # [N] or None (only with a rollout correction)
    sequences: Optional[Sequences]  # which tokens form a sequence, when known
    weights: torch.Tensor  # [N] aggregation weights: loss = Σ w·ℓ
    options: LossOptions
    params: RowParams  # what a fused row backend sees


class LossArgs(NamedTuple):
    """The arguments every loss entry point takes after its scores (the logits; hidden and weight; computed
    log-probs and entropy), declared once: :func:`loss_entry` writes them into each entry point's signature
    and :func:`bind` binds a call's. The first five are taken by position too, the rest by keyword only."""

    targets: torch.Tensor  # [...] token ids
    advantages: torch.Tensor  # [...], or one per sequence
    old_logprobs: Optional[torch.Tensor] = None  # [...] the behaviour policy's log-probs
    ref_logprobs: Optional[torch.Tensor] = None  # [...] the frozen reference's log-probs
    mask: Optional[torch.Tensor] = None  # [...] bool or 0/1
    rollout_logprobs: Optional[torch.Tensor] = None  # [...] the inference engine's log-probs (rollout_is)
    cu_seqlens: Optional[torch.Tensor] = None  # [S + 1] packed sequences in a flattened leading shape
    options: Optional[LossOptions] = None  # bound: the call's LossOptions, with its keyword options applied
    global_num_tokens: Union[int, float, torch.Tensor, None] = None
    global_num_sequences: Union[int, float, torch.Tensor, None] = None
    validate: bool = True


POSITIONAL = LossArgs._fields[: LossArgs._fields.index("mask") + 1]
"""The :class:`LossArgs` taken by position (targets … mask); the others are keyword-only."""
TENSORS = LossArgs._fields[: LossArgs._fields.index("cu_seqlens") + 1]
"""The :class:`LossArgs` that are one call's tensors; the others are the call's settings."""


def bind(where: str, tensors: Tuple, keywords: Dict[str, Any]) -> LossArgs:
    """The :class:`LossArgs` of a call of the entry point ``where``: ``tensors`` given by position, ``keywords``
    its other keywords, where those that name no argument are loss options (``TypeError`` for an unknown one)."""
    if len(tensors) > len(POSITIONAL):
        raise TypeError(f"{where}() takes at most {len(POSITIONAL)} tensors by position after its scores "
                        f"({', '.join(POSITIONAL)}), got {len(tensors)}")
    given = dict(zip(POSITIONAL, tensors))
    twice = [name for name in given if name in keywords]
    if twice:
        raise TypeError(f"{where}() got multiple values for argument(s) {twice}")
    given.update({name: value for name, value in keywords.items() if name in LossArgs._fields})
    missing = [name for name in LossArgs._fields if name not in given and name not in LossArgs._field_defaults]
    if missing:
        raise TypeError(f"{where}() missing required argument(s) {missing}")
    loss_options = {name: value for name, value in keywords.items() if name not in LossArgs._fields}
    given["options"] = LossOptions.from_kwargs(given.get("options"), loss_options, where)
    return LossArgs(**given)


def loss_entry(fn: Callable) -> Callable:
    """The whole signature of a loss entry point ``fn(scores, *tensors, own keywords, **keywords)`` that binds
    its ``tensors`` and ``keywords`` with :func:`bind`: ``*tensors`` stands for the :class:`LossArgs` taken by
    position, ``**keywords`` for the other ones and every loss option with its default.

    ``inspect.signature`` and ``help()`` show every parameter; the call itself is ``fn``'s.
    """
    Parameter = inspect.Parameter
    signature = inspect.signature(fn)
    clash = sorted(set(signature.parameters) & (set(LossArgs._fields) | OPTION_NAMES))
    if clash:
        raise TypeError(f"{fn.__name__} declares {clash}, which loss_entry adds itself")
    types = get_type_hints(LossArgs)
    args = [Parameter(name, Parameter.POSITIONAL_OR_KEYWORD if name in POSITIONAL else Parameter.KEYWORD_ONLY,
                      default=LossArgs._field_defaults.get(name, Parameter.empty), annotation=types[name])
            for name in LossArgs._fields]
    loss_options = [Parameter(f.name, Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                    for f in dataclasses.fields(LossOptions)]
    params = []
    for param in signature.parameters.values():
        if param.kind is Parameter.VAR_POSITIONAL:
            params += [p for p in args if p.kind is Parameter.POSITIONAL_OR_KEYWORD]
        elif param.kind is Parameter.VAR_KEYWORD:
            params += [p for p in args if p.kind is Parameter.KEYWORD_ONLY] + loss_options
        else:
            params.append(param)
    fn.__signature__ = signature.replace(parameters=params)
    return fn


class Checks:
    """Value checks on device tensors, resolved together with one host synchronisation."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._pending: List[Tuple[torch.Tensor, Callable[[], str]]] = []

    def fail_if(self, bad: torch.Tensor, message: Callable[[], str], what: str) -> None:
        """Raise ``ValueError(message())`` when the 0-d bool tensor ``bad`` is true.

        ``what`` is the short, data-free message of the asynchronous assertion used inside
        ``torch.compile`` (no host sync there; a RuntimeError when it fires).
        """
        if not self.enabled:
            return
        if torch.compiler.is_compiling():
            torch._assert_async(~bad, f"rlhf_fast: {what}")
        else:
            self._pending.append((bad, message))

    def resolve(self) -> None:
        if not self._pending:
            return
        flags = torch.stack([bad.reshape(()).to(torch.bool) for bad, _ in self._pending]).tolist()
        for flag, (_, message) in zip(flags, self._pending):
            if flag:
                raise ValueError(message())


def check_scores(name: str, t, last: str) -> None:
    """The checks of the tensor a loss is computed from (the logits, the hidden states): a floating-point tensor
    with a last dimension (``last`` says which); ``ValueError`` naming it."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fp32, bf16 or fp16), got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have {last}")


def check_tensor(name: str, t, device: torch.device, other: str = "logits") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {other} is on {device}; put all tensors on one device")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs stay fp64 (gradcheck, ground truth); everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shard_range(vocab_local: int, device: torch.device, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's first vocabulary id and the total vocabulary (0-d int64 tensors), for targets that are global
    ids over vocabulary shards (:mod:`rlhf_fast.loss.vocab_parallel`).

    Shards may differ in size (V not divisible by the world size); ranks hold them in order.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = vocab_local
    dist.all_reduce(sizes, group=group)
    return sizes[:rank].sum(), sizes.sum()


def prepare_targets(
    lead: torch.Size, vocab: int, device: torch.device, targets, mask, checks: Checks, process_group=None,
    other: str = "logits",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(targets [N], valid [N])``: ids checked against the vocabulary, sanitised where masked.

    With a ``process_group`` (vocabulary shards) the ids come back shard-local, −1 where
    another rank owns the target or the row is masked.
    """
    check_tensor("targets", targets, device, other)
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if targets.shape != lead:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match the leading shape {tuple(lead)} of {other}"
        )
    if mask is None:
        valid = torch.ones(lead, dtype=torch.bool, device=device)
    else:
        check_tensor("mask", mask, device, other)
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match targets shape {tuple(lead)}")
        if mask.is_complex():
            raise ValueError(f"mask must be bool or hold 0 and 1, got {mask.dtype}")
        valid = mask if mask.dtype == torch.bool else mask != 0
        if mask.dtype != torch.bool:
            checks.fail_if(((mask != 0) & (mask != 1)).any(),
                           lambda: "mask must be bool or hold only 0 and 1 (a fractional or NaN mask is not a "
                                   "weight); pass mask.bool() or mask != 0", "mask must hold only 0 and 1")
    total_vocab = vocab
    if process_group is not None:  # this rank holds a vocabulary shard
        vocab_start, total_vocab = shard_range(vocab, device, process_group)
    in_range = (targets >= 0) & (targets < total_vocab)
    bad = valid & ~in_range
    checks.fail_if(bad.any(), lambda: (
        f"targets has ids outside [0, {int(total_vocab)}) at valid positions, e.g. {targets[bad][:5].tolist()} "
        "(mask them out, or fix the vocabulary size)"), "targets has ids outside [0, V) at valid positions")
    if process_group is None:
        safe = torch.where(valid & in_range, targets, torch.zeros_like(targets))
    else:
        local = targets - vocab_start.to(targets.dtype)
        owned = valid & in_range & (local >= 0) & (local < vocab)
        safe = torch.where(owned, local, torch.full_like(local, -1))
    return safe.reshape(-1).contiguous(), valid.reshape(-1).contiguous()


def per_row(
    name: str, t, shape: torch.Size, valid: torch.Tensor, device, dtype: torch.dtype,
    sequences: Optional[Sequences] = None, other: str = "logits", allow_per_sequence: bool = False,
) -> Optional[torch.Tensor]:
    """A per-token float input as a contiguous, detached ``[N]`` vector in ``dtype``, 0 where masked.

    With ``allow_per_sequence``, one value per sequence is accepted too (``[S]`` with
    ``sequences``, or ``[B]`` for a ``[B, ...]`` shape) and broadcast over its tokens (a
    per-token tensor wins when S = N). Inputs are constants of the loss: detached.
    """
    if t is None:
        return None
    check_tensor(name, t, device, other)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    t = t.detach()
    if t.shape == shape:
        t = t.reshape(-1)
    elif allow_per_sequence and sequences is not None and t.shape == (sequences.count,):
        t = sequences.expand(t)
    elif allow_per_sequence and len(shape) >= 2 and t.shape == shape[:1]:  # [B] over [B, T, ...]
        t = t.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape).reshape(-1)
    else:
        count = sequences.count if sequences is not None else shape[0] if allow_per_sequence and len(shape) >= 2 \
            else None
        hint = f" or [{count}] (one per sequence)" if count is not None else ""
        raise ValueError(f"{name} shape {tuple(t.shape)} must be {tuple(shape)}{hint}")
    t = t.to(dtype)
    # Padding values (NaN, inf) at masked positions must not leak into the loss or its gradient.
    return torch.where(valid, t, torch.zeros_like(t)).contiguous()


def sequences_of(lead: torch.Size, device, cu_seqlens, checks: Checks, other: str = "logits") -> Optional[Sequences]:
    """The sequences of the tokens: from ``cu_seqlens`` (packed), else the rows of a ``[B, T]`` shape."""
    n = lead.numel()
    if cu_seqlens is None:
        if len(lead) != 2:
            return None
        batch, seq = lead
        index = torch.arange(batch, device=device).repeat_interleave(seq)
        return Sequences(index, batch)
    check_tensor("cu_seqlens", cu_seqlens, device, other)
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [S + 1], got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    checks.fail_if((cu_seqlens[0] != 0) | (cu_seqlens[-1] != n) | (lengths < 0).any(), lambda: (
        f"cu_seqlens must start at 0, end at the number of tokens N = {n} and never decrease, got "
        f"{cu_seqlens[:8].tolist()}{' …' if cu_seqlens.numel() > 8 else ''} (ending at {int(cu_seqlens[-1])})"),
        "cu_seqlens must start at 0, end at N and never decrease")
    checks.resolve()  # a malformed cu_seqlens would make the index below meaningless
    count = cu_seqlens.numel() - 1
    index = torch.repeat_interleave(torch.arange(count, device=device), lengths.long(), output_size=n)
    return Sequences(index, count)


def check_global_count(name: str, value, device, checks: Checks) -> None:
    """``global_num_tokens`` / ``global_num_sequences``: a finite number > 0, or a one-element tensor of one."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the loss is on {device}")
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must hold a count, got dtype {value.dtype}")
        checks.fail_if(~(value.to(torch.float64) > 0).all() | ~torch.isfinite(value.to(torch.float64)).all(),
                       lambda: f"{name} must be a finite number > 0, got {value.reshape(()).item()!r}",
                       f"{name} must be a finite number > 0")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor, got {value!r}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def prepare(lead: torch.Size, vocab: int, device: torch.device, dtype: torch.dtype, args: LossArgs,
            process_group=None, other: str = "logits") -> LossInputs:
    """Every per-token input of a loss call, checked and flattened (``other`` names the scores' tensor).

    ``lead`` is the leading shape of the logits (or hidden states), ``vocab`` their (shard's)
    vocabulary size and ``dtype`` their dtype; ``args`` are the call's arguments (:func:`bind`).
    """
    options = args.options
    params = options.row_params(has_old=args.old_logprobs is not None, has_ref=args.ref_logprobs is not None)
    if options.rollout_is != "none" and args.rollout_logprobs is None:
        raise ValueError(f"rollout_is={options.rollout_is!r} needs rollout_logprobs (the inference engine's "
                         "log-probs of the sampled tokens)")
    checks = Checks(args.validate)
    safe, valid = prepare_targets(lead, vocab, device, args.targets, args.mask, checks, process_group, other)
    sequences = sequences_of(lead, device, args.cu_seqlens, checks, other)
    if sequences is None and (options.needs_sequences or options.loss_agg != "token-mean"):
        what = (f"loss_agg {options.loss_agg!r}" if options.loss_agg != "token-mean"
                else f"policy_loss={options.policy_loss!r}" if POLICY_LOSSES.get(options.policy_loss).needs_sequences
                else "rollout_is_level='sequence'")
        raise ValueError(f"{what} needs sequences: targets of shape [B, T], or cu_seqlens for packed input "
                         f"(got targets of shape {tuple(lead)})")
    if args.advantages is None:
        raise ValueError("advantages must be a tensor, got None")
    compute = compute_dtype(dtype)
    adv = per_row("advantages", args.advantages, lead, valid, device, compute, sequences, other,
                  allow_per_sequence=True)
    old = per_row("old_logprobs", args.old_logprobs, lead, valid, device, compute, other=other)
    ref = per_row("ref_logprobs", args.ref_logprobs, lead, valid, device, compute, other=other)
    rollout = None
    if options.rollout_is != "none":
        rollout = per_row("rollout_logprobs", args.rollout_logprobs, lead, valid, device, compute, other=other)
    if options.loss_agg != "token-mean" and args.global_num_tokens is not None:
        raise ValueError("global_num_tokens applies to loss_agg='token-mean' only")
    if options.loss_agg == "token-mean" and args.global_num_sequences is not None:
        raise ValueError("global_num_sequences applies to the seq-* loss_agg modes only (token-mean takes "
                         "global_num_tokens)")
    check_global_count("global_num_tokens", args.global_num_tokens, device, checks)
    check_global_count("global_num_sequences", args.global_num_sequences, device, checks)
    norm_length = options.norm_length
    if options.loss_agg == "seq-mean-token-sum-norm" and norm_length is None:
        if args.cu_seqlens is not None:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' with cu_seqlens needs norm_length (e.g. the "
                             "maximum completion length, as TRL's dr_grpo uses)")
        norm_length = lead[1]
    checks.resolve()
    weights = aggregation_weights(valid, options.loss_agg, sequences, args.global_num_tokens, norm_length, compute,
                                  args.global_num_sequences)
    return LossInputs(safe, valid, lead, adv, old, ref, rollout, sequences, weights.contiguous(), options, params)
