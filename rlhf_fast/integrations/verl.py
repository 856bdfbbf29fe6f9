"""verl's fused-kernel actor forward, with log-probs and entropy from ``rf.fused_linear_logprobs``.

verl's actor, with ``actor_rollout_ref.model.use_fused_kernels=True``, calls the model as
``model(input_ids, attention_mask, position_ids, temperature=τ, return_dict=True, use_cache=False)``
and reads ``output.log_probs`` and ``output.entropy``: the log-prob of the next token at every
position and the entropy of its distribution, differentiable, ``[B, T]`` for padded input and
``[1, total_nnz]`` for remove-padding (packed) input. :func:`forward` is that forward: the
backbone's hidden states, then ``rf.fused_linear_logprobs`` with the LM head (bias, logit scale
and soft-cap included, :mod:`rlhf_fast.integrations.transformers`), returned as verl's
``CausalLMOutputForPPO``. The targets are ``shift_labels`` when verl passes them (verl 0.9.1's
FSDP engine does on every remove-padding call), else ``labels`` or ``input_ids`` rolled by one, as
verl's own backends do.

Selecting it from verl's config (docs/integrations.md)::

    actor_rollout_ref.model.external_lib=rlhf_fast.integrations.verl
    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=rlhf_fast

``external_lib`` makes every verl worker import this module, which registers the
``rlhf_fast`` backend name with verl's forward patching (:func:`install`; the other backend
names are untouched). :func:`patch_model` patches one model directly.

Differences from verl's torch backend: the entropy is fp32 like the log-probs whatever the model's
dtype (verl's log-probs are fp32, its entropy is in the hidden states' dtype), an LM head bias and
the model's logit transform are applied (verl's backends ignore both), and targets of -100 give 0
instead of an index error.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from ..loss import fused_linear_logprobs
from .transformers import UnsupportedModelError, backbone, lm_head

__all__ = ["BACKEND", "forward", "install", "patch_model"]

BACKEND = "rlhf_fast"
"""The ``fused_kernel_options.impl_backend`` value that selects :func:`forward`."""

# verl routes these model types to forwards of their own (vision inputs, hybrid attention)
_OWN_FORWARDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")


def _output_type():
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    return CausalLMOutputForPPO


def forward(
    self: nn.Module,
    input_ids: Optional[torch.LongTensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.LongTensor] = None,
    past_key_values=None,
    inputs_embeds: Optional[torch.FloatTensor] = None,
    labels: Optional[torch.LongTensor] = None,
    use_cache: Optional[bool] = None,
    output_attentions: Optional[bool] = None,
    output_hidden_states: Optional[bool] = None,
    return_dict: Optional[bool] = None,
    cache_position: Optional[torch.LongTensor] = None,
    logits_to_keep=0,
    temperature: float = 1.0,
    shift_labels: Optional[torch.LongTensor] = None,
    **kwargs,
):
    """The fused-kernel forward verl's actor calls (bound to the model: ``self`` is the causal LM)."""
    if return_dict is False:
        raise ValueError("the rlhf_fast fused forward returns verl's CausalLMOutputForPPO only (return_dict=True)")
    optional = dict(past_key_values=past_key_values, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, cache_position=cache_position)
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    outputs = backbone(self)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **kwargs)
    hidden = outputs[0]
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        targets = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        targets = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("the rlhf_fast fused forward needs input_ids, labels or shift_labels to know the targets")
    head = lm_head(self, verify=False)
    targets = targets.to(hidden.device)
    valid = targets >= 0  # an ignore index (-100) scores nothing
    log_probs, entropy = fused_linear_logprobs(
        hidden, head.weight, torch.where(valid, targets, torch.zeros_like(targets)), valid,
        temperature=float(temperature), with_entropy=True, bias=head.bias, logit_scale=head.logit_scale,
        logit_softcap=head.logit_softcap,
    )
    return _output_type()(
        log_probs=log_probs, entropy=entropy, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
    )


def patch_model(model: nn.Module, *, verify_head="auto") -> nn.Module:
    """Make ``model(...)`` the fused forward (on this instance); returns the model.

    The output layer is checked once here (:func:`rlhf_fast.integrations.transformers.lm_head`,
    ``verify_head``): a model whose logits rlhf_fast cannot reproduce raises
    :class:`~rlhf_fast.integrations.transformers.UnsupportedModelError`.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _OWN_FORWARDS:
        raise UnsupportedModelError(
            f"verl gives {model_type} models a fused forward of its own (vision inputs); the rlhf_fast backend "
            "covers text-only causal LMs: use fused_kernel_options.impl_backend=torch for this model"
        )
    lm_head(model, verify=verify_head)
    model.forward = types.MethodType(forward, model)
    model._verl_fused_kernels_backend = BACKEND
    return model


def install() -> None:
    """Register ``impl_backend=rlhf_fast`` with verl's forward patching (idempotent; other names unchanged)."""
    from verl.models.transformers import monkey_patch

    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "_rlhf_fast", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            patch_model(model)
            return None
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends._rlhf_fast = True
    patch_forward_with_backends.__doc__ = original.__doc__
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


install()
