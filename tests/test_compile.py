"""``rf.ppo_loss`` inside a ``torch.compile``d step: one graph, no break, same numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_BACKENDS, device_for
from helpers import assert_outputs_close, make_case, run_loss

import rlhf_fast as rf


@pytest.mark.parametrize("backend", ["eager"] + FAST_BACKENDS)
@pytest.mark.parametrize("validate", [False, True])
def test_fullgraph_compile_matches_eager(backend, validate, use_backend):
    name = use_backend(backend)
    case = make_case(2, 4, 33, strided=True, seed=11, device=device_for(backend))
    options = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, validate=validate)

    def step(x):
        out = rf.ppo_loss(x[:, :-1], case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                          case.mask, backend=name, **options)
        return out

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = case.logits_base.detach().clone().requires_grad_(True)
    out = compiled(x)
    out.loss.backward()
    ref_out, ref_grad = run_loss(case, "eager", **options)
    assert_outputs_close(out, x.grad, ref_out, ref_grad, what=f"compiled {backend}")


def test_every_entry_point_compiles_with_its_tensors_by_keyword():
    """The entry points bind their shared arguments in Python (LossArgs): no graph break, the same loss."""
    case = make_case(2, 4, 13, seed=12)
    t, a, old, mask = case.targets, case.advantages, case.old_logprobs, case.mask
    hidden, weight = torch.randn(2, 4, 6), torch.randn(13, 6)
    module = rf.PPOLoss(clip_eps=0.1, backend="eager")

    def from_logprobs(x):
        lp, entropy = rf.logprobs(x, t, mask, with_entropy=True, backend="eager")
        return rf.logprobs_ppo_loss(lp, entropy, t, advantages=a, old_logprobs=old, mask=mask, vocab_size=13,
                                    entropy_coef=0.01).loss

    steps = [
        (lambda x: rf.ppo_loss(x, targets=t, advantages=a, mask=mask, backend="eager", kl_coef=0.0).loss,
         case.logits()),
        (lambda x: module(x, t, advantages=a, old_logprobs=old, mask=mask, validate=False).loss, case.logits()),
        (from_logprobs, case.logits()),
        (lambda h: rf.fused_linear_ppo_loss(h, weight, t, a, old, mask=mask, chunk_size=4, backend="eager").loss,
         hidden),
    ]
    for step, x in steps:
        torch._dynamo.reset()
        assert torch.equal(torch.compile(step, backend="aot_eager", fullgraph=True)(x), step(x))


@pytest.mark.skipif("cpp" not in FAST_BACKENDS, reason="needs the C++ extension")
def test_first_call_inside_compile_loads_the_backend():
    """The backend's lazy import happens at trace time, not as a graph break."""
    import subprocess
    import sys

    code = (
        "import torch, rlhf_fast as rf\n"
        "x = torch.randn(2, 4, 33, requires_grad=True)\n"
        "t = torch.randint(0, 33, (2, 4)); a = torch.randn(2, 4)\n"
        "f = torch.compile(lambda x: rf.ppo_loss(x, t, a, backend='cpp').loss, backend='aot_eager', fullgraph=True)\n"
        "f(x).backward()\n"
        "assert torch.isfinite(x.grad).all()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
