"""The loss entry points' shared arguments (``LossArgs`` in rlhf_fast/loss/inputs.py, declared once): every
signature shows them and the loss options, every way Python allows of passing them gives the same loss, and a
call the signature refuses is refused with a ``TypeError`` naming the entry point."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers import make_case

import rlhf_fast as rf
from rlhf_fast.loss.inputs import loss_entry

P = inspect.Parameter
TENSORS = ["targets", "advantages", "old_logprobs", "ref_logprobs", "mask"]
SETTINGS = ["rollout_logprobs", "cu_seqlens", "options", "global_num_tokens", "global_num_sequences", "validate"]
LOSS_OPTIONS = {f.name: f.default for f in dataclasses.fields(rf.LossOptions)}
# each entry point's own parameters: (before the shared tensors, keyword-only)
OWN = {
    "ppo_loss": (["logits"], ["inplace_backward", "grad_in_forward", "backend", "process_group"]),
    "fused_linear_ppo_loss": (["hidden", "weight"], ["bias", "chunk_size", "logit_scale", "logit_softcap", "backend",
                                                     "process_group"]),
    "logprobs_ppo_loss": (["logprobs", "entropy"], ["vocab_size"]),
}


@pytest.mark.parametrize("name", sorted(OWN))
def test_signature_shows_every_parameter(name):
    params = inspect.signature(getattr(rf, name)).parameters
    leading, own_keywords = OWN[name]
    assert list(params) == leading + TENSORS + own_keywords + SETTINGS + list(LOSS_OPTIONS)
    assert all(params[p].kind is P.POSITIONAL_OR_KEYWORD for p in leading + TENSORS)
    assert all(params[p].kind is P.KEYWORD_ONLY for p in own_keywords + SETTINGS + list(LOSS_OPTIONS))
    assert [params[p].default for p in TENSORS] == [P.empty, P.empty, None, None, None]
    assert [params[p].default for p in SETTINGS] == [None, None, None, None, None, True]
    assert {p: params[p].default for p in LOSS_OPTIONS} == LOSS_OPTIONS
    assert params["targets"].annotation is torch.Tensor


def test_module_forward_shows_the_call_arguments_and_no_loss_option():
    params = inspect.signature(rf.PPOLoss().forward).parameters
    leading, own_keywords = OWN["ppo_loss"]
    assert list(params) == leading + TENSORS + own_keywords + [s for s in SETTINGS if s != "options"]


def _calls(case, logits):
    """The same call of ppo_loss written in each form Python allows: (args, kwargs)."""
    t, a, old, ref, mask = case.targets, case.advantages, case.old_logprobs, case.ref_logprobs, case.mask
    return [
        ((logits, t, a, old, ref, mask), {}),
        ((logits, t, a), dict(old_logprobs=old, ref_logprobs=ref, mask=mask)),
        ((logits,), dict(targets=t, advantages=a, old_logprobs=old, ref_logprobs=ref, mask=mask)),
        ((), dict(logits=logits, targets=t, advantages=a, old_logprobs=old, ref_logprobs=ref, mask=mask)),
        ((logits, t, a, old, ref, mask), dict(options=rf.LossOptions(kl_coef=0.1), kl_coef=0.05)),
    ]


def test_every_form_of_a_call_gives_the_same_loss():
    case = make_case(2, 4, 13, seed=3)
    want = rf.ppo_loss(case.logits(), case.targets, case.advantages, case.old_logprobs, case.ref_logprobs,
                       case.mask, kl_coef=0.05, backend="eager")
    module = rf.PPOLoss(kl_coef=0.05, backend="eager")
    for args, kwargs in _calls(case, case.logits()):
        inspect.signature(rf.ppo_loss).bind(*args, **kwargs)
        got = rf.ppo_loss(*args, **{"kl_coef": 0.05, "backend": "eager", **kwargs})
        assert torch.equal(got.loss, want.loss), kwargs.keys()
        if "options" not in kwargs:
            assert torch.equal(module(*args, **kwargs).loss, want.loss), kwargs.keys()
    hidden, weight = torch.randn(2, 4, 6), torch.randn(13, 6)
    via_keywords = rf.fused_linear_ppo_loss(hidden=hidden, weight=weight, targets=case.targets,
                                            advantages=case.advantages, mask=case.mask, backend="eager")
    by_position = rf.fused_linear_ppo_loss(hidden, weight, case.targets, case.advantages, None, None, case.mask,
                                           backend="eager")
    assert torch.equal(via_keywords.loss, by_position.loss)
    lp, entropy = rf.logprobs(case.logits(), case.targets, case.mask, with_entropy=True, backend="eager")
    via_keywords = rf.logprobs_ppo_loss(lp, entropy, targets=case.targets, advantages=case.advantages,
                                        mask=case.mask, vocab_size=13)
    by_position = rf.logprobs_ppo_loss(lp, entropy, case.targets, case.advantages, None, None, case.mask,
                                       vocab_size=13)
    assert torch.equal(via_keywords.loss, by_position.loss)


def test_a_call_the_signature_refuses_is_refused():
    case = make_case(2, 4, 13, seed=4)
    x, t, a = case.logits(), case.targets, case.advantages
    refused = [
        ((x, t, a, None, None, None, None), {}, r"ppo_loss\(\) takes at most 5 tensors by position"),
        ((x, t, a), dict(advantages=a), r"ppo_loss\(\) got multiple values for argument\(s\) \['advantages'\]"),
        ((x, t), {}, r"ppo_loss\(\) missing required argument\(s\) \['advantages'\]"),
        ((x, t, a), dict(clip=0.2), r"ppo_loss\(\) got unexpected keyword argument\(s\) \['clip'\]"),
    ]
    for args, kwargs, message in refused:
        with pytest.raises(TypeError):
            inspect.signature(rf.ppo_loss).bind(*args, **kwargs)
        with pytest.raises(TypeError, match=message):
            rf.ppo_loss(*args, **kwargs)
    with pytest.raises(TypeError, match=r"fused_linear_ppo_loss\(\) missing required argument"):
        rf.fused_linear_ppo_loss(torch.randn(2, 4, 6), torch.randn(13, 6), t)
    with pytest.raises(TypeError, match="vocab_size"):
        rf.logprobs_ppo_loss(torch.randn(2, 4), torch.randn(2, 4), t, a)


def test_module_refuses_loss_options_per_call_and_tensors_at_construction():
    case = make_case(2, 4, 13, seed=5)
    module = rf.PPOLoss(backend="eager", validate=False, global_num_tokens=4)
    assert module.call_options == dict(backend="eager", validate=False, global_num_tokens=4)
    for keyword in ("clip_eps", "options", "clip"):
        with pytest.raises(ValueError, match=f"PPOLoss.forward: unknown keyword.*{keyword}"):
            module(case.logits(), case.targets, case.advantages, **{keyword: None})
    with pytest.raises(ValueError, match="unknown PPOLoss option.*rollout_logprobs"):
        rf.PPOLoss(rollout_logprobs=case.old_logprobs)


def test_an_entry_point_cannot_declare_a_shared_argument_itself():
    def entry(logits, *tensors, mask=None, **keywords):
        return logits

    with pytest.raises(TypeError, match=r"entry declares \['mask'\]"):
        loss_entry(entry)
