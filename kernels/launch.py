"""Launch configuration of the kernels, in one place: tiles, warps and row splits keyed on the vocabulary, the
logits' dtype and the row count, and the small host-side helpers of the launchers."""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import triton


class LaunchConfig(NamedTuple):
    block_v: int  # elements per tile of the streaming kernels (forward, logprobs)
    num_warps: int
    bwd_block_v: int  # elements per backward tile
    bwd_num_warps: int
    parts: int = 1  # programs per row of the forward (1: the one-pass kernels)
    bwd_parts: int = 1  # programs per row of the backward
    grad_row_block: int = 0  # ROW_BLOCK of the gradient-in-forward kernel; 0: it does not apply
    grad_num_warps: int = 0
    grad_max_registers: int = 0  # per thread: two programs per SM, one loads while the other computes


_TILE_BYTES = 8192  # the largest tile: 4 warps × 32 threads × four 16-byte vectors
_GRAD_ROW_BYTES = 65536  # the largest row the gradient-in-forward kernel holds in registers
_DEFAULT_SMS = 132  # H100 / H200, for launches without a CUDA device (interpreter, static model)
_FIXUP_ROWS = 32  # rows per program of the target fixup: one warp, one row per thread


def launch_config(vocab: int, dtype: torch.dtype, rows: int = 1 << 30, num_sms: int = _DEFAULT_SMS) -> LaunchConfig:
    """Tiles, warps and row splits for a vocabulary size, logits dtype and row count.

    Every thread reads four 16-byte vectors per tile: rows of 32 KiB and more get 4 warps
    (8 KiB tiles), smaller rows 2 or 1, since each warp also pays the per-row merge and
    loss math once. A row is split across programs only when the rows alone give fewer
    than four programs per SM (about eight programs per SM in all). The
    gradient-in-forward kernel holds a row of at most 64 KiB in the registers of 8 warps
    (64 per thread, 128 in all): two programs per SM and no spills, which
    benchmarks/static_roofline.py checks.
    """
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    row_bytes = vocab * elem_bytes
    warps = 4 if row_bytes >= 4 * _TILE_BYTES else 2 if row_bytes >= 2 * _TILE_BYTES else 1
    block = warps * _TILE_BYTES // 4 // elem_bytes  # four 16-byte vectors per thread
    tiles = max(1, vocab // block)
    parts = 1
    if rows < 4 * num_sms:
        parts = min(tiles, triton.cdiv(8 * num_sms, max(rows, 1)), 64)
        parts = max(1, parts)
    row_block = triton.next_power_of_2(vocab)
    # The row is held as four chunks of whole 16-byte vectors: at least 64 bytes, at most 64 KiB.
    grad_block = row_block if 64 <= row_block * elem_bytes <= _GRAD_ROW_BYTES else 0
    grad_warps = max(1, min(8, row_block * elem_bytes // 8192)) if grad_block else 0
    return LaunchConfig(block, warps, block, warps, parts, parts, grad_block, grad_warps, 128 if grad_block else 0)


def _rows(logits: torch.Tensor):
    batch, seq, vocab = logits.shape
    return batch * seq, seq, vocab


def _vec(logits: torch.Tensor) -> int:
    return 16 // logits.element_size()


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _inv(temperature: float) -> float:
    """fp32(1 / fp32(τ)), correctly rounded, which the exact division needs: the fp64 quotient
    rounded to fp32 is (rounding twice is harmless for a division of fp32 numbers in fp64).
    Plain Python: no tensor, nothing for torch.compile to trace."""
    return _fp32(1.0 / _fp32(temperature))


def _split(vocab: int, block: int, parts: int):
    """(body tiles per program, programs per row): no program without a tile."""
    tiles = max(1, vocab // block)
    per_part = triton.cdiv(tiles, max(1, parts))
    return per_part, triton.cdiv(tiles, per_part)


def _sms(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _DEFAULT_SMS


def _same_phase(logits: torch.Tensor, out: torch.Tensor) -> bool:
    """Every row of out sits at the 16-byte phase of its logits row (relative to each tensor's
    start): one head serves both, and the gradient's stores stay 16 bytes wide."""
    vec = _vec(logits)
    return (out.stride(0) - logits.stride(0)) % vec == 0 and (out.stride(1) - logits.stride(1)) % vec == 0
