"""The launchers of the Triton kernels of the fused PPO loss (what ``rlhf_fast.backends.triton`` calls).

The kernels are split by concern: ``streaming.py`` reads a row (the head / body / tail walk, the
online-softmax step, the row statistics), ``token_math.py`` is the per-token math, ``row_gradient.py``
the coefficients and entries of d(logits), ``forward_kernels.py`` and ``backward_kernels.py`` the
kernels, ``launch.py`` the launch configuration (tiles, warps, row splits; ``launch_config``).

The math is the contract's (docs/contract.md, sections "Per-token math", "Gradient" and
"Numerics"). Logits are read as ``[B, T, V]`` with free strides on B and T and stride 1 on
V; row ``i`` of the ``N = B·T`` rows is ``(i // T, i % T)``, so ``logits[:, :-1]`` needs no
copy. x = logits / τ in fp32, equal to a true division. Per row: m = max_j x_j,
s = Σ_j exp(x_j − m), lp = (x_y − m) − log s, p_j = exp((x_j − m) − log s),
H = log s − Σ_j p_j·(x_j − m): the row max is subtracted before anything else.

Kernels:

* ``_ppo_forward_kernel``, ``_logprobs_kernel``: one program per row, one pass over it.
  Each lane (one 16-byte vector slot of a thread) keeps its own running max, Σe and Σe·z,
  so the loop has no reduction across threads; the lanes merge once per row.
* ``_row_partials_kernel`` + ``_combine_kernel``: the same when the rows alone cannot fill
  the GPU: each row's vocabulary is split across programs, then combined per row.
* ``_ppo_backward_kernel``: a grid of (rows, parts of a row), each program a loop over tiles;
  ``_target_fixup_kernel`` then writes the target entries of confident targets (the one-hot
  factor 1 − p_y as Σ_{j≠y} p_j, which the parts of a split row each summed a piece of).
* ``_ppo_forward_grad_kernel`` (opt-in): a row that fits in registers is read once, and
  its d(Σ w·ℓ)/d(logits) is written from the same registers.

Numerics beyond the math above (docs/contract.md, "Numerics"): per-token terms above e^64
are carried with a log scale (``_token_math``); 1 − p_y of a confident target is Σ_{j≠y} p_j;
a coefficient that is not finite over τ is handled by a per-row shift of p (``_coefficients``).

Every row is read as a head (the elements before its first 16-byte boundary), a body of
whole tiles (unmasked 16-byte loads and stores), a tail of whole vectors (masked per
vector, still 16 bytes wide) and the last partial vector; the head and that last vector
(fewer than 2·16/b elements) are read one by one. So any vocabulary (50257, 32001) keeps
vector access.

Bytes model (b = bytes per logit; per-row vectors are O(N) and left out): forward and
logprobs read N·V·b; backward reads N·V·b and writes N·V·b (rows whose two coefficients
are 0 only write zeros); the gradient-in-forward kernel reads N·V·b and writes N·V·b
instead of the 3·N·V·b of forward + backward (and four 16-byte vectors of the target's lane
again per row). No ``[N, V]`` temporary exists.

Specialisation: τ, ε, β, η, c, V, T and the strides are run-time arguments; the feature
switches are old/ref log-probs given, the KL estimator, the dual clip, τ ≠ 1 (the exact
division), vocabulary shards (the probability outside them), and the layout ones (16-byte
vector size, tile size, rows of the gradient in the logits' 16-byte phase).
benchmarks/static_roofline.py compiles every kernel for sm_90 and models its speed on
H100 / H200.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from .backward_kernels import _ppo_backward_kernel, _target_fixup_kernel
from .forward_kernels import (
    _combine_kernel,
    _logprobs_kernel,
    _ppo_forward_grad_kernel,
    _ppo_forward_kernel,
    _row_partials_kernel,
)
from .launch import (  # noqa: F401  (LaunchConfig, launch_config: the launchers' public configuration)
    _FIXUP_ROWS,
    _GRAD_ROW_BYTES,
    LaunchConfig,
    _inv,
    _rows,
    _same_phase,
    _sms,
    _split,
    _vec,
    launch_config,
)

# ----------------------------------------------------------------------------------
# Launchers: no allocation except the split-row partials; no autograd.
# ----------------------------------------------------------------------------------


def _split_forward(logits, targets, outputs, advantages, old, ref, scalars, switches, has_loss, has_entropy, cfg):
    rows, seq, vocab = _rows(logits)
    temperature = scalars[0]
    vec = _vec(logits)
    tiles_per_part, parts = _split(vocab, cfg.block_v, cfg.parts)
    partials = torch.empty((3, rows, parts), dtype=torch.float32, device=logits.device)
    wrap_triton(_row_partials_kernel)[(rows, parts)](
        # data
        logits, partials,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), rows, tiles_per_part, parts,
        # constants
        temperature, _inv(temperature),
        # switches
        HAS_ENTROPY=has_entropy,
        SCALED=temperature != 1.0,
        VEC=vec,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    wrap_triton(_combine_kernel)[(rows,)](
        # data
        logits, partials, targets, advantages, old, ref, *outputs,
        # shapes and strides
        rows, parts, seq, logits.stride(0), logits.stride(1),
        # constants
        *scalars,
        # switches
        HAS_LOSS=has_loss,
        HAS_ENTROPY=has_entropy,
        **switches,
        PARTS_BLOCK=triton.next_power_of_2(parts),
        num_warps=1,
    )  # fmt: skip


def ppo_forward(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: Optional[torch.Tensor],  # [N] fp32
    ref_logprobs: Optional[torch.Tensor],  # [N] fp32
    outputs,  # 11 fp32 [N] buffers in TokenResults order
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,  # 0 disables it
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    has_old, has_ref = old_logprobs is not None, ref_logprobs is not None
    old = old_logprobs if has_old else advantages  # never read: a valid pointer
    ref = ref_logprobs if has_ref else advantages
    scalars = (temperature, _inv(temperature), ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef)
    switches = dict(
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        KL_ESTIMATOR=kl_estimator if has_ref else 0,  # one variant when there is no KL
        HAS_DUAL_CLIP=dual_clip > 0.0,
        SCALED=temperature != 1.0,
    )
    if cfg.parts > 1:
        _split_forward(logits, targets, outputs, advantages, old, ref, scalars, switches, True, True, cfg)
        return
    wrap_triton(_ppo_forward_kernel)[(rows,)](
        # data
        logits, targets, advantages, old, ref, *outputs,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        *scalars,
        # switches
        **switches,
        VEC=_vec(logits),
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip


def ppo_backward(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    row_max: torch.Tensor,  # [N] fp32
    log_sum: torch.Tensor,  # [N] fp32
    entropy: torch.Tensor,  # [N] fp32
    coef_logprob: torch.Tensor,  # [N] fp32
    coef_entropy: torch.Tensor,  # [N] fp32
    temperature: float,
    out: torch.Tensor,  # [B, T, V] logits dtype, stride 1 on V; may be logits
    outside: Optional[torch.Tensor] = None,  # [N] fp32 probability on other vocabulary shards
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    vec = _vec(logits)
    tiles_per_part, parts = _split(vocab, cfg.bwd_block_v, cfg.bwd_parts)
    # Split rows leave Σ_{j≠y} p_j per part to the fixup kernel (a few bytes per row); whole rows need none.
    partials = torch.empty((rows, parts) if parts > 1 else (1,), dtype=torch.float32, device=logits.device)
    has_outside = outside is not None
    wrap_triton(_ppo_backward_kernel)[(rows, parts)](
        # data
        logits, out, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy,
        outside if has_outside else entropy,  # never read without HAS_OUTSIDE: a valid pointer
        partials,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), tiles_per_part, parts,
        # constants
        temperature, _inv(temperature),
        # switches
        SCALED=temperature != 1.0,
        GRAD_ALIGNED=_same_phase(logits, out),
        HAS_OUTSIDE=has_outside,
        VEC=vec,
        BLOCK_V=cfg.bwd_block_v,
        num_warps=cfg.bwd_num_warps,
    )  # fmt: skip
    if parts == 1:
        return
    wrap_triton(_target_fixup_kernel)[(triton.cdiv(rows, _FIXUP_ROWS),)](
        # data
        out, targets, entropy, coef_logprob, coef_entropy, outside if has_outside else entropy, partials,
        # shapes and strides
        rows, parts, seq, out.stride(0), out.stride(1),
        # constants
        temperature, _inv(temperature),
        # switches
        HAS_OUTSIDE=has_outside,
        ROWS=_FIXUP_ROWS,
        PARTS_BLOCK=triton.next_power_of_2(parts),
        num_warps=1,
    )  # fmt: skip


def logprobs(
    logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [N]
    out_logprobs: torch.Tensor,  # [N] fp32
    out_entropy: Optional[torch.Tensor],  # [N] fp32 or None
    out_row_max: torch.Tensor,  # [N] fp32
    out_log_sum: torch.Tensor,  # [N] fp32
    temperature: float,
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    has_entropy = out_entropy is not None
    entropy = out_entropy if has_entropy else out_logprobs  # never written: a valid pointer
    if cfg.parts > 1:
        scalars = (temperature, _inv(temperature), 0.0, 0.0, 0.0, 0.0, 0.0)
        switches = dict(HAS_OLD=False, HAS_REF=False, KL_ESTIMATOR=0, HAS_DUAL_CLIP=False, SCALED=temperature != 1.0)
        lp = out_logprobs
        outputs = (lp, entropy, out_row_max, out_log_sum) + (lp,) * 7  # the loss outputs are never written
        _split_forward(logits, targets, outputs, lp, lp, lp, scalars, switches, False, has_entropy, cfg)
        return
    wrap_triton(_logprobs_kernel)[(rows,)](
        # data
        logits, targets, out_logprobs, entropy, out_row_max, out_log_sum,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        temperature, _inv(temperature),
        # switches
        HAS_ENTROPY=has_entropy,
        SCALED=temperature != 1.0,
        VEC=_vec(logits),
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )  # fmt: skip


def forward_grad_applies(logits: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`ppo_forward_grad` runs for these tensors: bf16 or fp32 rows of at most
    64 KiB (``launch_config``) whose lengths and strides, in logits and in out, are multiples
    of 16 bytes (so every row starts at the 16-byte phase of the tensor's start; a start on a
    16-byte boundary, the rule for fresh allocations, then gives 16-byte access, else scalar
    access with the same results). fp16 rows are left to forward + backward: their second
    conversion to fp32 would stay live between the passes and spill. Shapes and strides only:
    it also decides for the fake tensors of torch.compile."""
    vocab = logits.shape[-1]
    vec = _vec(logits)
    strides = all(t.stride(0) % vec == 0 and t.stride(1) % vec == 0 for t in (logits, out))
    return (
        logits.dtype in (torch.bfloat16, torch.float32)
        and launch_config(vocab, logits.dtype).grad_row_block > 0
        and vocab % vec == 0
        and strides
    )


def ppo_forward_grad(
    logits: torch.Tensor,  # [B, T, V], rows 16-byte aligned, V·b ≤ 64 KiB
    targets: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] fp32
    old_logprobs: Optional[torch.Tensor],  # [N] fp32
    ref_logprobs: Optional[torch.Tensor],  # [N] fp32
    weights: torch.Tensor,  # [N] fp32 per-token aggregation weights
    outputs,  # 11 fp32 [N] buffers in TokenResults order
    out: torch.Tensor,  # [B, T, V] logits dtype: d(Σ w·ℓ)/d(logits)
    ratio_low: float,
    ratio_high: float,
    dual_clip: float,
    kl_coef: float,
    kl_estimator: int,
    entropy_coef: float,
    temperature: float,
    config: Optional[LaunchConfig] = None,
) -> None:
    rows, seq, vocab = _rows(logits)
    if not forward_grad_applies(logits, out):
        raise ValueError(f"logits: the gradient-in-forward kernel takes bf16 or fp32 rows of at most "
                         f"{_GRAD_ROW_BYTES} bytes starting on 16-byte boundaries; got {tuple(logits.shape)} "
                         f"{logits.dtype} with strides {logits.stride()} (out {out.stride()}); use ppo_forward + "
                         f"ppo_backward")  # fmt: skip
    if rows == 0:
        return
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    has_old, has_ref = old_logprobs is not None, ref_logprobs is not None
    wrap_triton(_ppo_forward_grad_kernel)[(rows,)](
        # data
        logits, out, targets, advantages,
        old_logprobs if has_old else advantages,  # never read: a valid pointer
        ref_logprobs if has_ref else advantages,
        weights, *outputs,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        # constants
        temperature, _inv(temperature), ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef,
        # switches
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        KL_ESTIMATOR=kl_estimator if has_ref else 0,
        HAS_DUAL_CLIP=dual_clip > 0.0,
        SCALED=temperature != 1.0,
        VEC=_vec(logits),
        ROW_BLOCK=cfg.grad_row_block,
        num_warps=cfg.grad_num_warps,
        maxnreg=cfg.grad_max_registers,
    )  # fmt: skip
