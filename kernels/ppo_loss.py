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
are carried with a log scale (``_store_token_loss``); 1 − p_y of a confident target is Σ_{j≠y} p_j;
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

from typing import NamedTuple, Optional

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
# Launchers: no allocation except the split-row partials; no autograd. Each takes the call of its op
# (the op's arguments by name, as rlhf_fast/backends/ops.py declares them: ``Op.bind``) and the op's outputs,
# allocated by the caller (fp32 [N] each, in the op's order).
# ----------------------------------------------------------------------------------


class _Launch(NamedTuple):
    rows: int
    seq: int
    vocab: int
    cfg: LaunchConfig
    scalars: tuple  # τ, 1/τ, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef: the kernels' constants
    switches: dict  # HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP, SCALED


def _launch(call, config: Optional[LaunchConfig]) -> _Launch:
    """What every launcher starts from: the rows, the launch configuration, and the run-time constants and
    feature switches of a call (a call without the loss settings, logprobs or the backward, gets zeros for
    them and every loss switch off)."""
    logits, temperature = call.logits, call.temperature
    rows, seq, vocab = _rows(logits)
    cfg = config or launch_config(vocab, logits.dtype, rows, _sms(logits))
    setting = lambda name: getattr(call, name, 0.0)  # noqa: E731
    has_old = getattr(call, "old_logprobs", None) is not None
    has_ref = getattr(call, "ref_logprobs", None) is not None
    scalars = (temperature, _inv(temperature), setting("ratio_low"), setting("ratio_high"), setting("dual_clip"),
               setting("kl_coef"), setting("entropy_coef"))  # fmt: skip
    switches = dict(
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        KL_ESTIMATOR=call.kl_estimator if has_ref else 0,  # one variant when there is no KL
        HAS_DUAL_CLIP=setting("dual_clip") > 0.0,
        SCALED=temperature != 1.0,
    )
    return _Launch(rows, seq, vocab, cfg, scalars, switches)


def _streaming(logits, block_v: int, num_warps: int) -> dict:
    """The launch options of a kernel that streams rows in tiles: its 16-byte vectors, tile and warps."""
    return dict(VEC=_vec(logits), BLOCK_V=block_v, num_warps=num_warps)


def _gather_parts(kernel, grid, data, rows: int, parts: int, seq: int, tensor, constants, **switches) -> None:
    """Launch a kernel that gathers the per-part results of split rows (``_combine_kernel``, ``_target_fixup_kernel``):
    after its ``data``, the rows, the parts and ``tensor``'s rows; one warp, a part a lane."""
    wrap_triton(kernel)[grid](
        # data
        *data,
        # shapes and strides
        rows, parts, seq, tensor.stride(0), tensor.stride(1),
        # constants
        *constants,
        # switches
        **switches,
        PARTS_BLOCK=triton.next_power_of_2(parts),
        num_warps=1,
    )  # fmt: skip


def _loss_inputs(call, switches: dict) -> tuple:
    """(advantages, old log-probs, reference log-probs) of a loss call, the advantages standing in, as a valid pointer
    never read, for log-probs not given."""
    old = call.old_logprobs if switches["HAS_OLD"] else call.advantages
    ref = call.ref_logprobs if switches["HAS_REF"] else call.advantages
    return call.advantages, old, ref


def _split_forward(logits, targets, outputs, inputs, scalars, switches, has_loss, has_entropy, cfg) -> None:
    """The forward of split rows: per-part statistics, then one program per row combines them (and, has_loss, writes
    the loss); ``inputs`` as :func:`_loss_inputs` gives them, ``outputs`` all 11 of ppo_forward."""
    rows, seq, vocab = _rows(logits)
    tiles_per_part, parts = _split(vocab, cfg.block_v, cfg.parts)
    partials = torch.empty((3, rows, parts), dtype=torch.float32, device=logits.device)
    wrap_triton(_row_partials_kernel)[(rows, parts)](
        # data
        logits, partials,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), rows, tiles_per_part, parts,
        # constants
        *scalars[:2],
        # switches
        HAS_ENTROPY=has_entropy,
        SCALED=switches["SCALED"],
        **_streaming(logits, cfg.block_v, cfg.num_warps),
    )  # fmt: skip
    _gather_parts(_combine_kernel, (rows,), (logits, partials, targets, *inputs, *outputs), rows, parts, seq, logits,
                  scalars, HAS_LOSS=has_loss, HAS_ENTROPY=has_entropy, **switches)


def ppo_forward(call, outputs, config: Optional[LaunchConfig] = None) -> None:
    """Op ``ppo_forward``: the 11 TokenResults of every row into ``outputs``."""
    logits = call.logits
    rows, seq, vocab, cfg, scalars, switches = _launch(call, config)
    if rows == 0:
        return
    inputs = _loss_inputs(call, switches)
    if cfg.parts > 1:
        _split_forward(logits, call.targets, outputs, inputs, scalars, switches, True, True, cfg)
        return
    wrap_triton(_ppo_forward_kernel)[(rows,)](
        # data
        logits, call.targets, *inputs, *outputs,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        *scalars,
        # switches
        **switches,
        **_streaming(logits, cfg.block_v, cfg.num_warps),
    )  # fmt: skip


def ppo_backward(call, outputs=(), config: Optional[LaunchConfig] = None) -> None:
    """Ops ``ppo_backward`` and ``ppo_backward_inplace``: d(loss)/d(logits) into ``call.out`` (may be the logits)."""
    logits, out, outside = call.logits, call.out, call.outside
    rows, seq, vocab, cfg, scalars, switches = _launch(call, config)
    if rows == 0:
        return
    tiles_per_part, parts = _split(vocab, cfg.bwd_block_v, cfg.bwd_parts)
    # Split rows leave Σ_{j≠y} p_j per part to the fixup kernel (a few bytes per row); whole rows need none.
    partials = torch.empty((rows, parts) if parts > 1 else (1,), dtype=torch.float32, device=logits.device)
    has_outside = outside is not None
    outside = outside if has_outside else call.entropy  # never read without HAS_OUTSIDE: a valid pointer
    per_row = (call.targets, call.row_max, call.log_sum, call.entropy, call.coef_logprob, call.coef_entropy)
    wrap_triton(_ppo_backward_kernel)[(rows, parts)](
        # data
        logits, out, *per_row, outside, partials,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), tiles_per_part, parts,
        # constants
        *scalars[:2],
        # switches
        SCALED=switches["SCALED"],
        GRAD_ALIGNED=_same_phase(logits, out),
        HAS_OUTSIDE=has_outside,
        **_streaming(logits, cfg.bwd_block_v, cfg.bwd_num_warps),
    )  # fmt: skip
    if parts == 1:
        return
    _gather_parts(_target_fixup_kernel, (triton.cdiv(rows, _FIXUP_ROWS),),
                  (out, call.targets, *per_row[3:], outside, partials), rows, parts, seq, out, scalars[:2],
                  HAS_OUTSIDE=has_outside, ROWS=_FIXUP_ROWS)


def logprobs(call, outputs, config: Optional[LaunchConfig] = None) -> None:
    """Op ``logprobs``: (log-probs, entropy if ``call.with_entropy``, row max, log-sum) into ``outputs``."""
    logits = call.logits
    rows, seq, vocab, cfg, scalars, switches = _launch(call, config)
    if rows == 0:
        return
    has_entropy = bool(call.with_entropy)
    out_logprobs, out_entropy, out_row_max, out_log_sum = outputs
    entropy = out_entropy if has_entropy else out_logprobs  # never written: a valid pointer
    if cfg.parts > 1:
        lp = out_logprobs
        outputs = (lp, entropy, out_row_max, out_log_sum) + (lp,) * 7  # the loss outputs are never written
        _split_forward(logits, call.targets, outputs, (lp, lp, lp), scalars, switches, False, has_entropy, cfg)
        return
    wrap_triton(_logprobs_kernel)[(rows,)](
        # data
        logits, call.targets, out_logprobs, entropy, out_row_max, out_log_sum,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1),
        # constants
        *scalars[:2],
        # switches
        HAS_ENTROPY=has_entropy,
        SCALED=switches["SCALED"],
        **_streaming(logits, cfg.block_v, cfg.num_warps),
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


def ppo_forward_grad(call, outputs, config: Optional[LaunchConfig] = None) -> None:
    """Ops ``ppo_forward_grad`` and ``ppo_forward_grad_inplace``: ``ppo_forward``'s outputs, and d(Σ w·ℓ)/d(logits)
    into ``call.out`` (may be the logits): rows 16-byte aligned, V·b ≤ 64 KiB (``forward_grad_applies``)."""
    logits, out = call.logits, call.out
    if not forward_grad_applies(logits, out):
        raise ValueError(f"logits: the gradient-in-forward kernel takes bf16 or fp32 rows of at most "
                         f"{_GRAD_ROW_BYTES} bytes starting on 16-byte boundaries; got {tuple(logits.shape)} "
                         f"{logits.dtype} with strides {logits.stride()} (out {out.stride()}); use ppo_forward + "
                         f"ppo_backward")  # fmt: skip
    rows, seq, vocab, cfg, scalars, switches = _launch(call, config)
    if rows == 0:
        return
    wrap_triton(_ppo_forward_grad_kernel)[(rows,)](
        # data
        logits, out, call.targets, *_loss_inputs(call, switches), call.weights, *outputs,
        # shapes and strides
        vocab, seq, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        # constants
        *scalars,
        # switches
        **switches,
        VEC=_vec(logits),
        ROW_BLOCK=cfg.grad_row_block,
        num_warps=cfg.grad_num_warps,
        maxnreg=cfg.grad_max_registers,
    )  # fmt: skip
