"""How the fused-linear loss cuts its rows into chunks: the default chunk size, the size every rank of a process
group agrees on, and chunks of whole sequences for the sequence-level options."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .policy import Sequences

_MIN_CHUNK = 256
"""Fewest rows per chunk (below it the matmuls are bound by reading the weight)."""
_MAX_CHUNK_ELEMENTS = 1 << 27
"""At most this many elements in the [chunk, V] buffer (512 MiB in fp32)."""


def default_chunk_size(vocab: int, hidden_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``.

    The rule: ``min(max(pow2_floor(H), 256), max(16, pow2_floor(2**27 // V)))``.

    * about H rows, so the ``[chunk, V]`` logits buffer is no larger than the weight
      ``[V, H]``: extra memory stays O(V·H) whatever the number of tokens;
    * at least 256 rows, so each chunk's matmuls reuse every weight element enough times
      to be compute-bound rather than weight-bandwidth-bound;
    * at most 2**27 buffer elements (512 MiB in fp32), which bounds the eager fallback's
      fp32 per-chunk temporaries at large V (V = 151936 gives 512 rows).
    """
    by_hidden = max(_pow2_floor(max(hidden_size, 1)), _MIN_CHUNK)
    return min(by_hidden, max_chunk_rows(vocab))


def max_chunk_rows(vocab: int) -> int:
    """The most rows a default ``[chunk, V]`` buffer may have: ``max(16, pow2_floor(2**27 // V))``."""
    return max(16, _pow2_floor(max(_MAX_CHUNK_ELEMENTS // max(vocab, 1), 1)))


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def agree_across_ranks(chunk: int, n_rows: int, wants_hidden_grad: bool, device, group) -> int:
    """The chunk size every rank uses (the smallest asked for), after checking that the ranks agree.

    Each chunk runs collectives, so every rank must walk the same chunks: shard sizes (hence
    the default chunk) may differ, the number of tokens and whether d(hidden) is all-reduced
    may not. One small collective (and a host sync) per call.
    """
    flags = torch.tensor([-chunk, n_rows, -n_rows, int(wants_hidden_grad), -int(wants_hidden_grad)],
                         dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    neg_chunk, most_rows, neg_fewest_rows, any_grad, neg_all_grad = flags.tolist()
    if most_rows != -neg_fewest_rows:
        raise ValueError(
            f"hidden must be replicated across the process group: ranks have between {-neg_fewest_rows} and "
            f"{most_rows} tokens"
        )
    if any_grad != -neg_all_grad:
        raise ValueError("hidden requires grad on some ranks of the process group but not on others")
    return -neg_chunk


def sequence_lengths(sequences: Sequences) -> List[int]:
    """The number of rows of each sequence, in order (sequences without rows left out)."""
    return torch.unique_consecutive(sequences.index, return_counts=True)[1].tolist()


def sequence_spans(lengths: List[int], chunk: int) -> Optional[List[slice]]:
    """Spans of at most ``chunk`` rows that hold whole sequences (consecutive, in order), or None when there
    are none or a sequence is longer than ``chunk`` (its coefficients would wait for rows of another chunk)."""
    if not lengths or max(lengths) > chunk:
        return None
    spans, start, stop = [], 0, 0
    for length in lengths:
        if stop + length - start > chunk:
            spans.append(slice(start, stop))
            start = stop
        stop += length
    spans.append(slice(start, stop))
    return spans


def local_sequences(sequences: Optional[Sequences], span: slice) -> Optional[Sequences]:
    """The sequences of the rows of ``span`` (whole sequences, see :func:`sequence_spans`), numbered from 0."""
    if sequences is None or span.stop <= span.start:
        return None
    index = sequences.index[span]
    first = int(index[0])
    return Sequences(index - first, int(index[-1]) - first + 1)
