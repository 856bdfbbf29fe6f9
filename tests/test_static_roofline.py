"""The static sm_90 check of the Triton kernels (``benchmarks/static_roofline.py``) on a CPU.

Compiles what the launchers launch, ahead of time for sm_90, and reads the SASS: no
kernel may spill, and every global access in the streaming loops must be 16 bytes wide
(8 bf16 or 4 fp32 logits per thread and access) for a vocabulary divisible by 8, and
also for an odd one (the head and the last partial vector are read apart). A change that
loses vector access or starts spilling fails here, on any machine, without a GPU.

It runs the script in a subprocess without ``TRITON_INTERPRET``: the test session imports
the kernels in interpreter mode on CPU.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import run_without_interpreter, triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "static_roofline.py")


def _static(tmp_path, *args: str) -> list:
    out = tmp_path / "static.json"
    run_without_interpreter(SCRIPT, "--json", str(out), *args, timeout=600)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    bf16 = _static(tmp, "--vocab", "50264", "50257", "--dtype", "bf16", "--ops", "forward", "logprobs", "backward")
    fp32 = _static(tmp, "--vocab", "32008", "--dtype", "fp32", "--ops", "forward", "backward")
    fused = _static(tmp, "--vocab", "32000", "--dtype", "bf16", "--ops", "grad_in_forward")
    return bf16 + fp32 + fused


def test_every_op_was_compiled(results):
    ops = {(r["kernel"], r["V"], r["dtype"]) for r in results}
    for vocab in (50264, 50257):
        assert {("forward", vocab, "bf16"), ("logprobs", vocab, "bf16"), ("backward", vocab, "bf16")} <= ops
    assert {("forward", 32008, "fp32"), ("backward", 32008, "fp32"), ("grad_in_forward", 32000, "bf16")} <= ops


def test_no_spills(results):
    for r in results:
        assert r["spills"] == 0, f"{r['kernel']} V={r['V']} {r['dtype']}: {r['spills']} bytes spilled"


@pytest.mark.parametrize("vocab", [50264, 50257, 32008])
def test_streaming_loops_use_16_byte_vectors(results, vocab):
    for r in (r for r in results if r["V"] == vocab):
        what = f"{r['kernel']} V={vocab} {r['dtype']}"
        assert r["load_widths"] and set(r["load_widths"]) == {"16"}, f"{what}: loads {r['load_widths']}"
        if r["kernel"] == "backward":
            assert set(r["store_widths"]) == {"16"}, f"{what}: stores {r['store_widths']}"
        else:
            assert not r["store_widths"], f"{what}: the forward loop stores {r['store_widths']}"


def test_gradient_in_forward_row_fits_on_chip(results):
    """A 32000-logit bf16 row in registers: 16-byte loads and stores, two programs per SM."""
    (fused,) = (r for r in results if r["kernel"] == "grad_in_forward")
    assert fused["ctas_per_sm"] >= 2, fused
    assert set(fused["load_widths"]) >= {"16"} and set(fused["store_widths"]) >= {"16"}, fused
