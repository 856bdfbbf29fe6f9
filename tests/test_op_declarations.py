"""The op declarations of rlhf_fast/backends/ops.py: each op's signature is written once, and the registered
ops of both backends, the fakes, the launchers and the recorded roofline launches all come from it."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import HAS_CPP, HAS_TRITON
from helpers import make_config

from rlhf_fast.backends import RowParams, ops

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")


def _registered(namespace: str, op: ops.Op) -> str:
    schema = str(getattr(getattr(torch.ops, namespace), op.name).default._schema)
    return schema.split("(", 1)[1]


@needs_cpp
@pytest.mark.parametrize("op", ops.OPS, ids=lambda op: op.name)
def test_cpp_ops_have_the_declared_schema(op):
    assert "(" + _registered("rlhf_fast", op) == op.schema()


@needs_triton
@pytest.mark.parametrize("op", ops.TRITON_OPS, ids=lambda op: op.name)
def test_triton_ops_have_the_declared_schema_and_a_launcher(op):
    import rlhf_fast.backends.triton  # noqa: F401  (registers the ops)
    from rlhf_fast.kernels import ppo_loss as kernels

    assert "(" + _registered("rlhf_fast_triton", op) == op.schema()
    assert list(inspect.signature(getattr(kernels, op.launcher)).parameters)[:2] == ["call", "outputs"]


@pytest.mark.parametrize("op", ops.TRITON_OPS, ids=lambda op: op.name)
def test_the_cuda_registration_infers_the_declared_schema(op):
    """With CUDA the ops are ``torch.library.triton_op``s, whose schema torch infers from the generated
    body's signature; registering one (in a namespace of its own, never called) needs no GPU."""

    def body(*args, **kwargs):
        raise AssertionError("registered only")

    torch.library.triton_op(f"rlhf_fast_test_cuda::{op.name}", op.function(body), mutates_args=op.mutates)
    assert "(" + _registered("rlhf_fast_test_cuda", op) == op.schema()


def test_schema_marks_the_written_argument_and_the_inplace_twin():
    assert "Tensor(a8!) out" in ops.PPO_BACKWARD.schema()
    inplace = ops.PPO_BACKWARD_INPLACE
    assert inplace.name == "ppo_backward_inplace" and inplace.launcher == "ppo_backward"
    assert "out" not in [a.name for a in inplace.args] and inplace.schema().startswith("(Tensor(a0!) logits")
    assert ops.PPO_FORWARD_GRAD_INPLACE.mutates == ("logits",) and ops.PPO_FORWARD.mutates == ()


def test_bind_names_the_arguments_and_fills_defaults():
    logits, rows = torch.zeros(2, 3, 5), torch.zeros(6)
    call = ops.PPO_BACKWARD_INPLACE.bind(logits, rows.long(), rows, rows, rows, rows, rows, 0.7)
    assert call.out is logits and call.outside is None and call.temperature == 0.7
    with pytest.raises(TypeError):
        ops.PPO_BACKWARD.bind(logits, rows.long(), rows, rows, rows, rows, rows, 0.7)  # out missing


@pytest.mark.parametrize("with_entropy", [True, False])
def test_fake_allocates_every_output_per_row(with_entropy):
    logits = torch.empty(2, 3, 5, device="meta")
    outputs = ops.LOGPROBS.fake(logits, torch.empty(6, device="meta"), 1.0, with_entropy)
    assert [tuple(t.shape) for t in outputs] == [(6,), (6 if with_entropy else 0,), (6,), (6,)]
    assert all(t.dtype == torch.float32 for t in outputs)
    forward = ops.PPO_FORWARD.fake(**ops.token_inputs(logits, None, None, None, None, make_config()))
    assert len(forward) == len(ops.TOKEN_RESULTS) == 11
    assert ops.PPO_BACKWARD.fake(logits, *(None,) * 6, 1.0, logits) is None


def test_settings_are_the_row_params_in_the_ops_terms():
    params = RowParams(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator=1,
                           entropy_coef=0.01, temperature=0.7, has_old=True, has_ref=True)  # fmt: skip
    values = ops.settings(params)
    assert values == dict(ratio_low=1.0 - 0.2, ratio_high=1.0 + 0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator=1,
                          entropy_coef=0.01, temperature=0.7)  # fmt: skip
    names = {a.name for a in ops.PPO_FORWARD.args}
    assert set(values) <= names and set(values) <= {a.name for a in ops.PPO_FORWARD_GRAD.args}
