"""The C++ CPU backend: ``torch.ops.rlhf_fast.*`` (csrc/) as a :class:`~rlhf_fast.backends.RowOps`.

Importing this module defines the op schemas and fakes (declared in :mod:`.ops`), then loads the compiled
extension ``rlhf_fast._C``, which registers their CPU implementations; it raises ``ImportError`` when the
extension is not built, and :mod:`rlhf_fast.backends` remembers why. The row functions are
:func:`.ops.row_ops` over the registered ops.
"""

from __future__ import annotations

import torch

from . import ops

if not hasattr(torch.ops.rlhf_fast, "ppo_forward"):  # a re-import after a failed load defines nothing twice
    ops.define_cpp_ops("rlhf_fast")
try:
    from .. import _C  # noqa: F401  (registers the implementations of torch.ops.rlhf_fast.*)
except ImportError as exc:
    raise ImportError(
        f"the C++ extension rlhf_fast._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` (a C++ compiler and torch installed, "
        "RLHF_FAST_BUILD_EXT unset or 1)"
    ) from exc

_ops = torch.ops.rlhf_fast


def cpu_capability() -> str:
    """Which kernel build runs here: ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``."""
    return _ops.cpu_capability()


ROW_OPS = ops.row_ops(lambda op: getattr(_ops, op.name))
forward, backward, logprobs = ROW_OPS.forward, ROW_OPS.backward, ROW_OPS.logprobs
