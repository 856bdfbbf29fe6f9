"""What the fused-linear loss needs from any Hugging Face causal LM: hidden states, the LM head (tied
or untied, with its bias) and the output transform real models apply to the logits (``logit_scale``,
``logit_softcap``), checked against the model's own forward.

The implementation lives in the training layer (:mod:`rlhf_fast.training.hf_models`), which the
PPO loop uses too; this module is its public home for trainers that bring their own loop.
"""

from ..training.hf_models import (
    LMHead,
    UnsupportedModelError,
    apply_transform,
    backbone,
    check_output_layer,
    from_pretrained,
    hidden_states,
    lm_head,
    output_transform,
    unwrap,
)

__all__ = [
    "LMHead",
    "UnsupportedModelError",
    "apply_transform",
    "backbone",
    "check_output_layer",
    "from_pretrained",
    "hidden_states",
    "lm_head",
    "output_transform",
    "unwrap",
]
