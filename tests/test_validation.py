"""Bad inputs raise a clear error naming the argument (docs/contract.md, "Inputs that are refused");
the lean import; dispatch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import backends


def _inputs(b=2, t=3, v=5):
    return dict(
        logits=torch.randn(b, t, v),
        targets=torch.randint(0, v, (b, t)),
        advantages=torch.randn(b, t),
        old_logprobs=torch.randn(b, t),
        ref_logprobs=torch.randn(b, t),
        mask=torch.ones(b, t, dtype=torch.bool),
    )


BAD = [
    ("targets", dict(targets=torch.randint(0, 5, (2, 4))), "targets shape"),
    ("targets float", dict(targets=torch.zeros(2, 3)), "targets must be int64 or int32"),
    ("logits int", dict(logits=torch.zeros(2, 3, 5, dtype=torch.long)), "logits must be a floating-point"),
    ("V == 0", dict(logits=torch.zeros(2, 3, 0)), "V == 0"),
    ("advantages shape", dict(advantages=torch.randn(3, 3)), "advantages shape"),
    ("advantages int", dict(advantages=torch.ones(2, 3, dtype=torch.long)), "advantages must be a floating"),
    ("old shape", dict(old_logprobs=torch.randn(2, 4)), "old_logprobs shape"),
    ("ref shape", dict(ref_logprobs=torch.randn(6)), "ref_logprobs shape"),
    ("mask shape", dict(mask=torch.ones(2, 4)), "mask shape"),
    ("target out of range", dict(targets=torch.full((2, 3), 5)), "outside [0, 5)"),
    ("negative target", dict(targets=torch.full((2, 3), -1)), "outside [0, 5)"),
    ("temperature", dict(temperature=0.0), "temperature"),
    ("clip_eps", dict(clip_eps=0.0), "clip_eps"),
    ("clip_eps_high", dict(clip_eps_high=-0.1), "clip_eps_high"),
    ("dual_clip", dict(dual_clip=1.0), "dual_clip"),
    ("estimator", dict(kl_estimator="k4"), "kl_estimator"),
    ("loss_agg", dict(loss_agg="mean"), "loss_agg"),
    ("backend", dict(backend="cuda"), "backend"),
    ("kl without ref", dict(ref_logprobs=None, kl_coef=0.1), "ref_logprobs"),
    ("seq agg on 1-D", dict(logits=torch.randn(4, 5), targets=torch.zeros(4, dtype=torch.long),
                            advantages=torch.randn(4), old_logprobs=None, ref_logprobs=None, mask=None,
                            loss_agg="seq-mean-token-sum"), "needs sequences: targets of shape [B, T]"),
    ("global tokens", dict(global_num_tokens=0), "global_num_tokens"),
    ("global tokens agg", dict(global_num_tokens=4, loss_agg="seq-mean-token-sum"), "global_num_tokens"),
    ("not a tensor", dict(advantages=[1.0, 2.0]), "advantages must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,changes,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, changes, message):
    kwargs = dict(_inputs(), backend="eager")
    kwargs.update(changes)
    with pytest.raises(ValueError, match=_escape(message)):
        rf.ppo_loss(**kwargs)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_out_of_range_target_at_masked_position_is_fine():
    kwargs = _inputs()
    kwargs["targets"][0, 0] = -100
    kwargs["mask"][0, 0] = False
    out = rf.ppo_loss(**kwargs, backend="eager")
    assert torch.isfinite(out.loss)
    kwargs["mask"][0, 0] = True
    with pytest.raises(ValueError, match="targets"):
        rf.ppo_loss(**kwargs, backend="eager")
    rf.ppo_loss(**kwargs, validate=False, backend="eager")  # the caller took responsibility


def test_devices_must_match():
    kwargs = _inputs()
    kwargs["advantages"] = kwargs["advantages"].to("meta")
    with pytest.raises(ValueError, match="advantages is on meta"):
        rf.ppo_loss(**kwargs, backend="eager")


def test_logprobs_rejects_bad_temperature_and_targets():
    with pytest.raises(ValueError, match="temperature"):
        rf.logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=-1.0)
    with pytest.raises(ValueError, match="targets"):
        rf.logprobs(torch.randn(2, 5), torch.full((2,), 9))


def test_unavailable_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(backends._failures, "cpp", "ImportError: not built")
    monkeypatch.delitem(backends._loaded, "cpp", raising=False)
    with pytest.raises(RuntimeError, match="build the C.. extension"):
        rf.ppo_loss(**_inputs(), backend="cpp")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rf.ppo_loss(**_inputs(), backend="triton")


def test_auto_without_extensions_is_eager(monkeypatch):
    monkeypatch.setitem(backends._failures, "cpp", "not built")
    monkeypatch.delitem(backends._loaded, "cpp", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends.resolve("auto", torch.randn(2, 3)) == "eager"
    assert backends.resolve("auto", torch.randn(2, 3, dtype=torch.float64)) == "eager"


def test_ppo_loss_module_holds_options():
    loss_fn = rf.PPOLoss(clip_eps=0.1, kl_coef=0.05, kl_estimator="k2", backend="eager")
    kwargs = _inputs()
    out = loss_fn(kwargs["logits"], kwargs["targets"], kwargs["advantages"], kwargs["old_logprobs"],
                  kwargs["ref_logprobs"], kwargs["mask"])
    direct = rf.ppo_loss(**kwargs, clip_eps=0.1, kl_coef=0.05, kl_estimator="k2", backend="eager")
    torch.testing.assert_close(out.loss, direct.loss)
    assert "kl_estimator='k2'" in repr(loss_fn)
    with pytest.raises(ValueError, match="unknown PPOLoss option"):
        rf.PPOLoss(clip=0.2)
    with pytest.raises(ValueError, match="kl_estimator"):
        rf.PPOLoss(kl_estimator="k5")


def test_import_is_lean():
    code = (
        "import sys, rlhf_fast\n"
        "bad = [m for m in ('triton', 'transformers', 'rlhf_fast._C', 'rlhf_fast.kernels') if m in sys.modules]\n"
        "import torch\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
