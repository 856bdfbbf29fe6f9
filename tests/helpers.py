"""Shared test helpers: the one tolerance table, input makers and comparisons.

Every backend is compared with the eager reference (``backend="eager"``) through the
public API; tolerances come from :data:`TOLERANCES` only (docs/contract.md, "Accuracy").
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import rlhf_fast as rf
from rlhf_fast.backends import RowParams


def make_config(has_old: bool = False, has_ref: bool = False, **options) -> RowParams:
    """What a row backend sees for these loss options (``rf.LossOptions`` keywords)."""
    return rf.LossOptions(**options).row_params(has_old=has_old, has_ref=has_ref)


LOSS_AXES = {
    "kl_estimator": ["k1", "k2", "k3", "k3+"],
    "clip_eps_high": [None, 0.28],
    "dual_clip": [None, 3.0],
    "loss_agg": ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
    "temperature": [1.0, 0.7],
    "entropy_coef": [0.0, 0.01],
}
"""The loss options the grid tests cross (``rf.ppo_loss`` keywords), each with values that take another branch
of the math or the aggregation: run whole, or as a :func:`pairwise_cover`."""

TOLERANCES = {
    # the contract's accuracy section: fp32 inputs, every backend vs the eager reference.
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}
DOUBLE_BASELINE_FACTOR = 2.0  # the contract: low-precision error ≤ 2× the eager reference's own
DOUBLE_BASELINE_ATOL = 1e-6


@dataclass
class Case:
    """One set of loss inputs; ``logits_base`` is the leaf that receives the gradient."""

    logits_base: torch.Tensor  # [B, T(+1), V] leaf
    targets: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T] or [B]
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    strided: bool
    expand: int = 0  # > 0: logits_base holds one sequence, scored for ``expand`` sequences (a stride-0 view)

    def view(self, base: torch.Tensor) -> torch.Tensor:
        """The logits as the loss sees them, of a leaf like ``logits_base``: expanded when ``expand``, then a
        strided ``[:, :-1]`` view when ``strided``."""
        if self.expand:
            base = base.expand(self.expand, *base.shape[1:])
        return base[:, :-1] if self.strided else base

    def logits(self) -> torch.Tensor:
        return self.view(self.logits_base)


def policy_inputs(logits: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, *, with_old: bool,
                  with_ref: bool, per_sequence_advantages: bool):
    """(old_logprobs, ref_logprobs, advantages) drawn from ``gen`` for fp32 ``logits`` [B, T, V] and ``targets``
    [B, T]: old / ref log-probs near the current policy's (ratios spread across the clip range, as in
    training) or None, and advantages [B] or [B, T]."""
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.4 * torch.randn(lp.shape, generator=gen) if with_old else None
    ref = lp + 0.4 * torch.randn(lp.shape, generator=gen) if with_ref else None
    advantages = torch.randn(lp.shape[:1] if per_sequence_advantages else lp.shape, generator=gen)
    return old, ref, advantages


def make_case(
    batch: int = 3,
    seq: int = 5,
    vocab: int = 129,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    strided: bool = False,
    int32_targets: bool = False,
    per_sequence_advantages: bool = False,
    with_old: bool = True,
    with_ref: bool = True,
    mask: str = "random",  # "none" | "random" (one fully masked row) | "all-masked"
    banned_tokens: int = 0,  # number of −inf logits per row (never the target)
    device: str = "cpu",
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    seq_logits = seq + 1 if strided else seq
    base = torch.randn(batch, seq_logits, vocab, generator=gen) * 2.0
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    if banned_tokens:
        for b, t in itertools.product(range(batch), range(seq)):
            banned = torch.randperm(vocab, generator=gen)[: banned_tokens + 1]
            banned = banned[banned != targets[b, t]][:banned_tokens]
            base[b, t, banned] = float("-inf")
    view = base[:, :-1] if strided else base
    old, ref, advantages = policy_inputs(view.to(dtype).float(), targets, gen, with_old=with_old, with_ref=with_ref,
                                         per_sequence_advantages=per_sequence_advantages)
    if mask == "none":
        m = None
    elif mask == "random":
        m = torch.rand(batch, seq, generator=gen) > 0.25
        m[0] = False  # one fully masked row
        targets = torch.where(m, targets, torch.full_like(targets, -100))  # padding ids
        if batch > 1:
            m[1, 0] = True
            targets[1, 0] = 0
    elif mask == "all-masked":
        m = torch.zeros(batch, seq, dtype=torch.bool)
    else:
        raise ValueError(mask)
    if int32_targets:
        targets = targets.to(torch.int32)
    base = base.to(dtype).to(device).requires_grad_(True)

    def put(t):
        return None if t is None else t.to(device)

    return Case(base, put(targets), put(advantages), put(old), put(ref), put(m), strided)


def run_loss(case: Case, backend: str, *, logits_dtype: Optional[torch.dtype] = None, **options):
    """Loss, outputs and d(loss)/d(logits_base) for one backend on a fresh copy of the leaf."""
    base = case.logits_base.detach().clone()
    if logits_dtype is not None:
        base = base.to(logits_dtype)
    base.requires_grad_(True)
    logits = case.view(base)
    if options.get("inplace_backward"):
        logits = logits * 1.0  # a non-leaf buffer the backward may overwrite
    out = rf.ppo_loss(
        logits, case.targets, case.advantages, case.old_logprobs, case.ref_logprobs, case.mask,
        backend=backend, **options,
    )
    out.loss.backward()
    return out, base.grad


def assert_outputs_close(out, grad, ref_out, ref_grad, dtype=torch.float32, what: str = "") -> None:
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.loss, ref_out.loss.to(out.loss.dtype), **tol, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(out.logprobs, ref_out.logprobs, **tol, msg=lambda m: f"{what} logprobs: {m}")
    torch.testing.assert_close(out.entropy, ref_out.entropy, **tol, msg=lambda m: f"{what} entropy: {m}")
    assert set(out.metrics) == set(ref_out.metrics), f"{what} metric names differ"
    for name, value in out.metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0, f"{what} metric {name}: not an fp32 scalar"
        torch.testing.assert_close(value, ref_out.metrics[name], **tol, msg=lambda m, n=name: f"{what} {n}: {m}")
    if ref_grad is None:
        assert grad is None or not grad.any()
    else:
        torch.testing.assert_close(grad, ref_grad, **tol, msg=lambda m: f"{what} d(logits): {m}")


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth.double()).abs().max().item() if value.numel() else 0.0


def assert_double_baseline(backend_vals: Dict[str, torch.Tensor], eager_vals: Dict[str, torch.Tensor],
                           truth_vals: Dict[str, torch.Tensor], what: str = "") -> None:
    """The contract's accuracy rule for bf16/fp16: max error vs fp64 truth ≤ 2× the eager reference's + 1e-6."""
    for name, truth in truth_vals.items():
        err = max_error(backend_vals[name], truth)
        bound = DOUBLE_BASELINE_FACTOR * max_error(eager_vals[name], truth) + DOUBLE_BASELINE_ATOL
        assert err <= bound, f"{what} {name}: error {err:.3g} > bound {bound:.3g}"


def outputs_dict(out, grad) -> Dict[str, torch.Tensor]:
    """The comparable values of one run (for the double baseline)."""
    vals = {"loss": out.loss, "logprobs": out.logprobs, "entropy": out.entropy, "grad": grad}
    vals.update({f"metric:{k}": v for k, v in out.metrics.items()})
    return vals


def pairwise_cover(axes: Dict[str, list]) -> list:
    """A small list of option dicts in which every pair of values of any two axes occurs.

    The full product is run on fast backends; slow ones (the Triton interpreter) run this
    cover, so every pairwise interaction is still exercised.
    """
    names = list(axes)
    uncovered = {
        (a, va, b, vb)
        for i, a in enumerate(names) for b in names[i + 1:]
        for va in range(len(axes[a])) for vb in range(len(axes[b]))
    }
    def pairs(combo):
        return {(a, combo[i], b, combo[j]) for i, a in enumerate(names) for j, b in enumerate(names) if i < j}

    candidates = list(itertools.product(*(range(len(axes[n])) for n in names)))
    rows = []
    while uncovered:  # greedy: the combination that covers the most uncovered pairs
        best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
        rows.append(best)
        uncovered -= pairs(best)
    return [{n: axes[n][c] for n, c in zip(names, combo)} for combo in rows]


def triton_installed() -> bool:
    """Whether triton imports (its compiler can then run for a GPU target on a machine without one)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def run_without_interpreter(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``python script *args`` with ``TRITON_INTERPRET`` unset, so that Triton compiles for the GPU (the test session
    imports the kernels in interpreter mode on CPU). Fails, with the ends of its output, unless it succeeds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{os.path.basename(script)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@contextlib.contextmanager
def closing_process_group():
    """Around a distributed worker's body (group already initialised): barrier on success, then teardown.

    No rank may exit (closing its gloo connections) while a peer still uses them: gloo
    aborts that peer ("terminate called without an active exception"). The barrier is on
    the success path only, so a failing rank exits instead of waiting for the others.
    """
    import torch.distributed as dist

    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


CHARS = "abcdefgh "
"""The alphabet of :func:`char_tokenizer` (token ids 2.., after <pad> = 0 and <eos> = 1)."""


def char_tokenizer():
    """A one-token-per-character tokenizer over :data:`CHARS`, for the tiny models of the trainer tests."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
