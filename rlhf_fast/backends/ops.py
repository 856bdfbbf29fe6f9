"""Every torch op of the fused backends, declared once: an :class:`Op` names the op, its arguments (tensors
with their shapes, scalar settings and switches, the buffer it writes) and its outputs.

From a declaration come the op's ``torch.library`` schema (:meth:`Op.schema`), its fake (:meth:`Op.fake`, an
allocation-only implementation that ``torch.compile`` traces with, which also allocates the outputs of the
real op), the call a launcher receives (:meth:`Op.bind`: the arguments by name) and each backend's
:class:`~rlhf_fast.backends.rows.RowOps` (:func:`row_ops`). The same ops exist in two namespaces:

* ``rlhf_fast`` — the C++ CPU kernels (``csrc/``): :func:`define_cpp_ops` defines the schemas here and
  registers the fakes; the extension registers only implementations;
* ``rlhf_fast_triton`` — the Triton kernels: :mod:`.triton` registers each op with its launcher
  (``kernels/ppo_loss.py``, named by :attr:`Op.launcher`) as its body.

Shapes: logits ``[B, T, V]`` (stride 1 on V), targets and every per-row vector ``[N = B·T]``, outputs fp32
``[N]`` (the forward's in :class:`~rlhf_fast.backends.rows.TokenResults` order: pg, loss and dlogp times
e^−log_scale, kl times e^−kl_log_scale). The math is the row contract of :class:`~rlhf_fast.backends.rows.RowOps`.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .rows import KERNEL_OUTPUTS, RowOps, RowParams, RowStats, TokenResults


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of an op: a tensor (``shape`` "logits" ``[B, T, V]``, "ids" int ``[N]``, "rows" fp32
    ``[N]``), or a scalar setting or switch (``float``, ``int``, ``bool``)."""

    name: str
    type: object  # Tensor, Optional[Tensor], float, int or bool
    shape: str = ""  # tensors only
    default: object = inspect.Parameter.empty


def _tensor(name: str, shape: str = "rows", optional: bool = False, **default) -> Arg:
    return Arg(name, Optional[Tensor] if optional else Tensor, shape, **default)


_LOGITS = _tensor("logits", "logits")  # [B, T, V]
_PPO_INPUTS = (
    _LOGITS,
    _tensor("targets", "ids"),  # [N] int32 | int64, sanitised ids
    _tensor("advantages"),  # [N] fp32
    _tensor("old_logprobs", optional=True),  # [N] fp32, or None: ratio 1
    _tensor("ref_logprobs", optional=True),  # [N] fp32, or None: no KL
)
_WEIGHTS = _tensor("weights")  # [N] fp32 aggregation weights w: loss = Σ w·ℓ
_TEMPERATURE = Arg("temperature", float)  # τ
_SETTINGS = (
    Arg("ratio_low", float),  # 1 − ε_low
    Arg("ratio_high", float),  # 1 + ε_high
    Arg("dual_clip", float),  # c, 0 = off
    Arg("kl_coef", float),  # β
    Arg("kl_estimator", int),  # 0 k1, 1 k2, 2 k3, 3 k3+
    Arg("entropy_coef", float),  # η
    _TEMPERATURE,
)
_OUT = _tensor("out", "logits")  # [B, T, V] logits' dtype, written: the gradient
_BACKWARD_INPUTS = (
    _LOGITS,
    _tensor("targets", "ids"),  # [N] ids, or −1: no one-hot term (the target is on another vocabulary shard)
    _tensor("row_max"),  # [N] fp32 m
    _tensor("log_sum"),  # [N] fp32 log s
    _tensor("entropy"),  # [N] fp32 H
    _tensor("coef_logprob"),  # [N] fp32 c_lp = d(loss)/d lp
    _tensor("coef_entropy"),  # [N] fp32 c_H
    _TEMPERATURE,
)
_OUTSIDE = _tensor("outside", optional=True, default=None)  # [N] fp32 probability on other vocabulary shards


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: its arguments in schema order, its fp32 ``[N]`` outputs, and the argument it writes."""

    name: str
    args: Tuple[Arg, ...]
    outputs: Tuple[str, ...] = ()
    writes: str = ""  # "out" (a buffer the caller passes) or "logits" (in place); "" when it writes none
    launcher: str = ""  # the Triton launcher in kernels/ppo_loss.py (default: the op's name)
    sized_by: Tuple[Tuple[str, str], ...] = ()  # (output, switch): [N] when the switch is on, else [0]
    doc: str = ""

    def __post_init__(self):
        if not self.launcher:
            object.__setattr__(self, "launcher", self.name)

    def inplace(self) -> Op:
        """The op that writes into the logits' own memory instead of ``out`` (one op whose two arguments alias
        while one is mutated is outside what torch.library ops may declare, hence a second op)."""
        return dataclasses.replace(self, name=f"{self.name}_inplace", args=tuple(a for a in self.args if a is not _OUT),
                                   writes="logits", doc=f"{self.name} into the logits' own memory")

    @property
    def mutates(self) -> Tuple[str, ...]:
        return (self.writes,) if self.writes else ()

    def signature(self) -> inspect.Signature:
        params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a.type,
                                    default=a.default) for a in self.args]  # fmt: skip
        returns = Tuple[(Tensor,) * len(self.outputs)] if self.outputs else None
        return inspect.Signature(params, return_annotation=returns)

    def function(self, body: Callable) -> Callable:
        """``body`` as a function with this op's signature (what torch.library infers the schema from)."""

        def op_function(*args, **kwargs):
            return body(*args, **kwargs)

        op_function.__name__ = op_function.__qualname__ = self.name
        op_function.__signature__ = self.signature()
        op_function.__doc__ = self.doc
        return op_function

    def schema(self) -> str:
        return torch.library.infer_schema(self.function(self.fake), mutates_args=self.mutates)

    def bind(self, *args, **kwargs) -> SimpleNamespace:
        """The arguments by name (defaults filled in); an op that writes the logits has ``out`` = logits."""
        bound = self.signature().bind(*args, **kwargs)
        bound.apply_defaults()
        call = SimpleNamespace(**bound.arguments)
        if self.writes == "logits":
            call.out = call.logits
        return call

    def fake(self, *args, **kwargs):
        """The outputs, allocated and not written: the op's fake, and the real op's allocation."""
        call = self.bind(*args, **kwargs)
        rows = call.logits.shape[0] * call.logits.shape[1]
        switches = dict(self.sized_by)
        outputs = tuple(call.logits.new_empty((rows if getattr(call, switches.get(name, ""), True) else 0,),
                                              dtype=torch.float32) for name in self.outputs)  # fmt: skip
        return outputs if outputs else None

    def positional(self, **values) -> tuple:
        """The arguments in schema order, from their names (defaults where not given)."""
        return tuple(values[a.name] if a.name in values else a.default for a in self.args)


TOKEN_RESULTS = TokenResults._fields[:KERNEL_OUTPUTS]

PPO_FORWARD = Op("ppo_forward", _PPO_INPUTS + _SETTINGS, TOKEN_RESULTS, doc="One pass per row → TokenResults.")
PPO_BACKWARD = Op("ppo_backward", _BACKWARD_INPUTS + (_OUT, _OUTSIDE), writes="out",
                  doc="Writes d(loss)/d(logits) into out.")
PPO_BACKWARD_INPLACE = PPO_BACKWARD.inplace()
LOGPROBS = Op("logprobs", (_LOGITS, _tensor("targets", "ids"), _TEMPERATURE, Arg("with_entropy", bool)),
              ("logprobs", "entropy", "row_max", "log_sum"), sized_by=(("entropy", "with_entropy"),),
              doc="(logprobs, entropy (empty without with_entropy), row_max, log_sum).")
PPO_FORWARD_GRAD = Op("ppo_forward_grad", _PPO_INPUTS + (_WEIGHTS,) + _SETTINGS + (_OUT,), TOKEN_RESULTS,
                      writes="out", doc="ppo_forward's outputs, and d(Σ w·ℓ)/d(logits) (upstream gradient 1) into out.")
PPO_FORWARD_GRAD_INPLACE = PPO_FORWARD_GRAD.inplace()

OPS = (PPO_FORWARD, PPO_BACKWARD, PPO_BACKWARD_INPLACE, LOGPROBS)
"""The ops of both backends."""
TRITON_OPS = OPS + (PPO_FORWARD_GRAD, PPO_FORWARD_GRAD_INPLACE)
"""The Triton backend's ops: also the gradient computed in the forward (one read of the logits)."""

CPP_DIAGNOSTICS = (
    "cpu_capability() -> str",  # the kernel build that runs here: "AVX512", "AVX2" or "DEFAULT"
    "runnable_builds() -> str[]",  # the builds this CPU can execute
    "choose_kernel_build(str aten_capability, str[] runnable) -> str",  # the choice rule, for tests
)
"""C++-only diagnostics (no tensors: nothing to trace, no fake)."""


def define_cpp_ops(namespace: str = "rlhf_fast") -> None:
    """Define every op's schema and fake in ``namespace`` (before the C++ extension loads)."""
    for op in OPS:
        qualname = f"{namespace}::{op.name}"
        torch.library.define(qualname, op.schema())
        torch.library.register_fake(qualname)(op.fake)
    for schema in CPP_DIAGNOSTICS:
        torch.library.define(f"{namespace}::{schema.split('(')[0]}", "(" + schema.split("(", 1)[1])


def settings(params: RowParams) -> Dict[str, object]:
    """The ops' per-token settings from :class:`RowParams` (ratio_low = 1 − ε_low, ratio_high = 1 + ε_high)."""
    return dict(ratio_low=1.0 - params.clip_eps_low, ratio_high=1.0 + params.clip_eps_high, dual_clip=params.dual_clip,
                kl_coef=params.kl_coef, kl_estimator=params.kl_estimator, entropy_coef=params.entropy_coef,
                temperature=params.temperature)  # fmt: skip


def token_inputs(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams) -> Dict[str, object]:
    """The arguments of the per-token ops (old / ref log-probs only where ``params`` says they are given)."""
    return dict(logits=logits, targets=targets, advantages=advantages,
                old_logprobs=old_logprobs if params.has_old else None,
                ref_logprobs=ref_logprobs if params.has_ref else None, **settings(params))  # fmt: skip


def row_ops(op_of: Callable[[Op], Callable], forward_with_grad: Optional[Callable] = None) -> RowOps:
    """A backend's :class:`RowOps` from its ops (``op_of(op)``: the callable op, e.g. ``torch.ops.ns.<name>``)."""
    forward_op, backward_op, backward_inplace_op, logprobs_op = (op_of(op) for op in OPS)

    def forward(logits, targets, advantages, old_logprobs, ref_logprobs, params: RowParams) -> TokenResults:
        """Per-token results for logits ``[B, T, V]`` and per-row vectors ``[N]``."""
        values = token_inputs(logits, targets, advantages, old_logprobs, ref_logprobs, params)
        return TokenResults(*forward_op(*PPO_FORWARD.positional(**values)))

    def backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, out,
                 outside=None) -> None:
        """Write d(loss)/d(logits) ``[B, T, V]`` into ``out`` (which may be ``logits`` itself)."""
        # Identity, not data_ptr: it also holds for the fake tensors of torch.compile.
        op = backward_inplace_op if out is logits else backward_op
        extra = (outside,) if out is logits else (out, outside)
        op(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, float(temperature), *extra)

    def logprobs(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool) -> RowStats:
        """Log-probs ``[N]`` (and entropy ``[N]`` or None) and the row statistics, without a graph."""
        lp, entropy, row_max, log_sum = logprobs_op(logits, targets, float(temperature), bool(with_entropy))
        return RowStats(lp, entropy if with_entropy else None, row_max, log_sum)

    return RowOps(forward, backward, logprobs, forward_with_grad)


__all__ = ["Arg", "Op", "OPS", "TRITON_OPS", "CPP_DIAGNOSTICS", "PPO_FORWARD", "PPO_BACKWARD", "PPO_BACKWARD_INPLACE",
           "LOGPROBS", "PPO_FORWARD_GRAD", "PPO_FORWARD_GRAD_INPLACE", "define_cpp_ops", "settings", "token_inputs",
           "row_ops"]
