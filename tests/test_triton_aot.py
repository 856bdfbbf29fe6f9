"""The Triton kernels as the GPU compiler sees them, checked on a machine without a GPU.

* Every kernel compiles ahead of time for sm_80 and sm_90 (``triton.compile`` with a
  ``GPUTarget``): code that only the interpreter accepts fails here. The 16-bit variants
  with aligned rows must use 16-byte vector loads and stores (the bandwidth they need).
* ``rf.ppo_loss`` in ``torch.compile(fullgraph=True)`` traces into the Triton kernels
  (``torch.library.triton_op``), and the compiler's analysis finds that the forward writes
  only its outputs.

Both run in a subprocess (this file as a script) with ``TRITON_INTERPRET`` unset: the
interpreter replaces ``@triton.jit`` functions when the kernels module is imported, and
the test session imports it in interpreter mode on CPU.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

# ----------------------------------------------------------------------------------
# Subprocess side
# ----------------------------------------------------------------------------------


def _signature(fn, logits_type: str, targets_type: str, constexprs: dict) -> dict:
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            types[name] = "*" + logits_type
        elif name == "targets_ptr":
            types[name] = "*" + targets_type
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name in ("V", "T") or "stride" in name:
            types[name] = "i32"
        else:
            types[name] = "fp32"
    return types


def _aligned(fn, types: dict) -> dict:
    """What a launch with 16-byte aligned pointers, V and strides specialises on."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if types[name].startswith("*") or name == "V" or "stride" in name
    }


def compile_all(capability: int) -> list:
    import torch
    import triton
    from rlhf_fast.kernels import ppo_loss as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bf16_big = kernels.launch_config(151936, torch.bfloat16)
    fp32_small = kernels.launch_config(129, torch.float32)
    fp16_mid = kernels.launch_config(1000, torch.float16)
    forward = dict(HAS_OLD=True, HAS_REF=True, HAS_DUAL_CLIP=True)
    variants = [
        # (kernel, logits, targets, aligned, constexprs, num_warps)
        *[(kernels._ppo_forward_kernel, "bf16", "i64", True,
           dict(forward, KL_ESTIMATOR=k, BLOCK_V=bf16_big.block_v), bf16_big.num_warps) for k in range(4)],
        (kernels._ppo_forward_kernel, "fp32", "i32", False,
         dict(HAS_OLD=False, HAS_REF=False, KL_ESTIMATOR=0, HAS_DUAL_CLIP=False, BLOCK_V=fp32_small.block_v),
         fp32_small.num_warps),
        (kernels._ppo_backward_kernel, "bf16", "i64", True, dict(BLOCK_V=bf16_big.bwd_block_v),
         bf16_big.bwd_num_warps),
        (kernels._ppo_backward_kernel, "fp16", "i32", False, dict(BLOCK_V=fp16_mid.bwd_block_v),
         fp16_mid.bwd_num_warps),
        (kernels._ppo_backward_kernel, "fp32", "i64", False, dict(BLOCK_V=fp32_small.bwd_block_v),
         fp32_small.bwd_num_warps),
        (kernels._logprobs_kernel, "bf16", "i64", True, dict(HAS_ENTROPY=True, BLOCK_V=bf16_big.block_v),
         bf16_big.num_warps),
        (kernels._logprobs_kernel, "fp32", "i32", False, dict(HAS_ENTROPY=False, BLOCK_V=fp32_small.block_v),
         fp32_small.num_warps),
    ]
    results = []
    for fn, logits_type, targets_type, aligned, constexprs, warps in variants:
        types = _signature(fn, logits_type, targets_type, constexprs)
        source = ASTSource(fn, types, constexprs, _aligned(fn, types) if aligned else None)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        results.append(dict(
            kernel=fn.__name__, logits=logits_type, aligned=aligned, constexprs=constexprs,
            cubin_bytes=len(compiled.asm["cubin"]),
            vector_loads=ptx.count("ld.global.v4"), vector_stores=ptx.count("st.global.v4"),
        ))  # fmt: skip
    return results


def trace_compiled_step(inplace: bool) -> list:
    """The graphs AOTAutograd hands to the backend, for CPU tensors and a pretend sm_90.

    The compiler's mutation analysis lowers each kernel to TTIR for the current target,
    which needs a driver; a stand-in that only names the target is enough (nothing runs).
    """
    import torch
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch import config as functorch_config
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    import rlhf_fast as rf
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

    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    try:
        torch.compile(step, backend=backend, fullgraph=True)(base)
    except Traced:
        pass
    return graphs


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------


def _run_here(*args: str, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")


@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
def test_every_kernel_compiles_ahead_of_time(capability):
    results = _run_here("compile", str(capability))
    assert {r["kernel"] for r in results} == {"_ppo_forward_kernel", "_ppo_backward_kernel", "_logprobs_kernel"}
    for r in results:
        assert r["cubin_bytes"] > 0, r
        if r["aligned"]:  # 16-byte vectors: what the bytes model's bandwidth needs
            assert r["vector_loads"] > 0, r
            if r["kernel"] == "_ppo_backward_kernel":
                assert r["vector_stores"] > 0, r


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
def test_compiled_step_traces_into_the_kernels(inplace):
    graphs = _run_here("trace", str(int(inplace)))
    kernels = [k for graph in graphs for k in graph]
    by_name = {k["kernel"]: k for k in kernels}
    assert set(by_name) == {"_ppo_forward_kernel", "_ppo_backward_kernel"}, graphs
    outputs = ["dlogp_ptr", "entropy_ptr", "kl_ptr", "logprobs_ptr", "loss_ptr", "lse_ptr", "pg_ptr", "ratio_ptr"]
    assert by_name["_ppo_forward_kernel"]["clones"] == outputs  # the logits are only read
    assert "grad_ptr" in by_name["_ppo_backward_kernel"]["clones"]


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    command, arg = sys.argv[1], int(sys.argv[2])
    result = compile_all(arg) if command == "compile" else trace_compiled_step(bool(arg))
    print(json.dumps(result, default=str))
