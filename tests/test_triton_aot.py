"""The Triton kernels as the GPU compiler sees them, checked on a machine without a GPU.

* Every kernel compiles ahead of time for sm_80 and sm_90, with the launches the launchers
  make (recorded on meta tensors by ``benchmarks/static_roofline.py``): code that only the
  interpreter accepts fails here. The streaming kernels use 16-byte vector loads (and the
  gradient kernels 16-byte stores), for odd vocabularies too.
* ``rf.ppo_loss`` in ``torch.compile(fullgraph=True)`` traces into the Triton kernels
  (``torch.library.triton_op``), and the compiler's analysis finds that the forward writes
  only its outputs; so does the gradient-in-forward op, into its one kernel.

Both run in a subprocess (this file as a script) with ``TRITON_INTERPRET`` unset: the
interpreter replaces ``@triton.jit`` functions when the kernels module is imported, and
the test session imports it in interpreter mode on CPU.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import pytest
from helpers import run_without_interpreter, triton_installed

# ----------------------------------------------------------------------------------
# Subprocess side
# ----------------------------------------------------------------------------------


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

# (op, vocabulary, logits dtype, rows, temperature): the launches the launchers make, so that
# every kernel and launch path compiles: one program per row, split rows (few rows), rows
# that are and are not multiples of 16 bytes, τ = 1 and τ ≠ 1, the gradient in the forward.
LAUNCHES = [
    ("forward", 151936, "bf16", 16384, 1.0),
    ("forward", 50257, "fp16", 64, 0.7),
    ("logprobs", 32001, "fp32", 16384, 0.7),
    ("logprobs", 151936, "bf16", 64, 1.0),
    ("backward", 151936, "bf16", 16384, 1.0),
    ("backward", 50257, "fp32", 64, 0.7),
    ("backward", 129, "fp16", 16384, 1.0),
    ("grad_in_forward", 32000, "bf16", 16384, 1.0),
    ("grad_in_forward", 16384, "fp32", 16384, 0.7),
]


def compile_all(capability: int) -> list:
    """Every launch of LAUNCHES, recorded from the launchers (meta tensors, no GPU) and compiled
    for ``capability`` with the specialisation a real launch gets (benchmarks/static_roofline.py)."""
    sys.path.insert(0, BENCHMARKS)
    import roofline_compile
    import roofline_record
    import torch

    from rlhf_fast.kernels import ppo_loss as kernels

    results = []
    for op, vocab, dtype, rows, temperature in LAUNCHES:
        launches = roofline_record.op_launches(kernels, op, vocab, roofline_record.DTYPES[dtype], rows,
                                               temperature=temperature)  # fmt: skip
        assert launches, (op, vocab, dtype)
        for launch in launches:
            compiled = roofline_compile.compile_launch(launch, arch=capability)
            results.append(dict(
                op=op, kernel=launch.name, vocab=vocab, logits=dtype, rows=rows, temperature=temperature,
                aligned=vocab * torch.empty((), dtype=roofline_record.DTYPES[dtype]).element_size() % 16 == 0,
                spill_bytes=compiled.spill_bytes, sass_lines=compiled.sass.count("\n"),
                vector_loads=compiled.ptx.count("ld.global.v4"), vector_stores=compiled.ptx.count("st.global.v4"),
            ))  # fmt: skip
    kernel_names = sorted(name for name in dir(kernels) if name.endswith("_kernel"))
    return dict(results=results, kernels=kernel_names)


def _trace(step, *inputs, backward: bool = True) -> list:
    """The Triton kernels (and the buffers each one writes) in the graphs AOTAutograd hands to the
    backend, for CPU tensors and a pretend sm_90.

    The compiler's mutation analysis lowers each kernel to TTIR for the current target,
    which needs a driver; a stand-in that only names the target is enough (nothing runs).
    """
    import torch
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch import config as functorch_config
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    from rlhf_fast import backends

    class TargetOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    triton.runtime.driver.set_active(TargetOnlyDriver())
    assert backends.load_ops("triton")[0] is not None, backends.load_ops("triton")[1]
    backends.resolve = lambda backend, logits: "triton"  # CPU tensors, compiled kernels: trace only
    functorch_config.force_non_lazy_backward_lowering = True

    graphs = []

    class Traced(Exception):
        pass

    def capture(gm, example_inputs):
        kernels = []
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while not inspect.isfunction(kernel):  # JITFunction, Autotuner, ... wrap .fn
                    kernel = kernel.fn
                name = kernel.__name__
                kernels.append(dict(kernel=name, clones=sorted(node.kwargs["tensors_to_clone"])))
        graphs.append(kernels)

        def run(*args):
            raise Traced()

        return run

    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    try:
        torch.compile(step, backend=backend, fullgraph=True)(*inputs)
    except Traced:
        pass
    return graphs


def trace_compiled_step(inplace: bool) -> list:
    """``rf.ppo_loss`` forward and backward."""
    import torch

    import rlhf_fast as rf

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 129, generator=gen, requires_grad=True)
    targets = torch.randint(0, 129, (2, 5), generator=gen)
    advantages, old, ref = (torch.randn(2, 5, generator=gen) for _ in range(3))

    def step(base):
        # In place: the usual case, a slice of a non-leaf buffer (the lm_head's output).
        logits = (base * 1.0)[:, :-1] if inplace else base[:, :-1]
        out = rf.ppo_loss(logits, targets, advantages, old, ref, kl_coef=0.1, entropy_coef=0.01,
                          inplace_backward=inplace, validate=False, backend="triton")
        return out.loss

    return _trace(step, base)


def trace_forward_with_grad(inplace: bool) -> list:
    """The Triton backend's forward_with_grad: one kernel, the gradient written in the forward."""
    import torch

    from rlhf_fast.backends import RowParams
    from rlhf_fast.backends import triton as triton_backend

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 1024, generator=gen)
    targets = torch.randint(0, 1024, (6,), generator=gen)
    advantages, old, ref = (torch.randn(6, generator=gen) for _ in range(3))
    weights = torch.full((6,), 1.0 / 6)
    params = RowParams(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator=2,
                       entropy_coef=0.01, temperature=0.7, has_old=True, has_ref=True)

    def step(logits):
        logits = logits * 1.0
        out = logits if inplace else torch.empty_like(logits)
        results = triton_backend.forward_with_grad(logits, targets, advantages, old, ref, params, weights, out)
        return results.loss, out

    return _trace(step, logits)


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------


def _run_here(*args: str, timeout: int = 300):
    proc = run_without_interpreter(os.path.abspath(__file__), *args, timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
def test_every_kernel_compiles_ahead_of_time(capability):
    compiled = _run_here("compile", str(capability))
    results = compiled["results"]
    assert {r["kernel"] for r in results} == set(compiled["kernels"]), "every kernel of the module, compiled"
    for r in results:
        assert r["sass_lines"] > 0, r
        if r["kernel"] in ("_combine_kernel", "_target_fixup_kernel"):
            continue  # per-row vectors only
        # 16-byte vectors for aligned rows and, thanks to the head/tail split, for odd ones too
        assert r["vector_loads"] > 0, r
        if r["kernel"] in ("_ppo_backward_kernel", "_ppo_forward_grad_kernel"):
            assert r["vector_stores"] > 0, r


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
def test_compiled_step_traces_into_the_kernels(inplace):
    graphs = _run_here("trace", str(int(inplace)))
    kernels = [k for graph in graphs for k in graph]
    by_name = {k["kernel"]: k for k in kernels}
    assert set(by_name) == {"_ppo_forward_kernel", "_ppo_backward_kernel"}, graphs
    outputs = ["dlogp_ptr", "entropy_ptr", "kl_log_scale_ptr", "kl_ptr", "log_scale_ptr", "log_sum_ptr",
               "logprobs_ptr", "loss_ptr", "pg_ptr", "ratio_ptr", "row_max_ptr"]
    assert by_name["_ppo_forward_kernel"]["clones"] == outputs  # the logits are only read
    assert "grad_ptr" in by_name["_ppo_backward_kernel"]["clones"]


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
def test_forward_with_grad_traces_into_one_kernel(inplace):
    graphs = _run_here("trace_grad", str(int(inplace)))
    kernels = [k for graph in graphs for k in graph]
    assert [k["kernel"] for k in kernels] == ["_ppo_forward_grad_kernel"], graphs
    assert "grad_ptr" in kernels[0]["clones"] and "logprobs_ptr" in kernels[0]["clones"]


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    command, arg = sys.argv[1], int(sys.argv[2])
    commands = {"compile": compile_all, "trace": lambda a: trace_compiled_step(bool(a)),
                "trace_grad": lambda a: trace_forward_with_grad(bool(a))}
    print(json.dumps(commands[command](arg), default=str))
