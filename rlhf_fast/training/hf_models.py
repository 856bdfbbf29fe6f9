"""What the fused-linear loss needs from a Hugging Face causal LM: hidden states, LM head, output transform.

Public as :mod:`rlhf_fast.integrations.transformers`; the PPO loop (:mod:`.models`) uses it too.

A causal LM computes ``logits = f(lm_head(h))`` from the backbone's last hidden state ``h``,
where ``f`` is the identity for most models and an elementwise map for some (config attribute,
models in transformers 5, ``f``):

* ``logit_scale`` (Cohere, Cohere 2), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1):
  ``f(z) = s·z``;
* ``logits_scaling`` (Granite, MiniCPM3): ``f(z) = z / s`` (HyperCLOVA X multiplies);
* ``final_logit_softcapping`` (Gemma 2, Gemma 3): ``f(z) = c·tanh(z / c)``, after the scale.

:func:`lm_head` returns the head's weight and bias with that transform as
``logit_scale`` / ``logit_softcap`` (the keywords of ``rf.fused_linear_ppo_loss`` and
``rf.fused_linear_logprobs``), so ``rf.fused_linear_*(hidden_states(model, ...), **head.loss_kwargs())``
scores exactly what ``model(...).logits`` scores. Nothing is taken on trust: :func:`check_output_layer`
runs the model's own forward once on three tokens with a forward hook that replaces the head's
output by known values ``z`` spanning ±60 (beyond any soft-cap), and compares the model's
logits with ``f(z)``; it also checks that the head's input is :func:`hidden_states`. Any other
post-processing (an unknown multiplier, a bias added after the head, a slice of the
vocabulary, a scaled hidden state, a forward that never calls the head module) raises
:class:`UnsupportedModelError` instead of giving wrong log-probs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "LMHead",
    "from_pretrained",
    "UnsupportedModelError",
    "backbone",
    "check_output_layer",
    "hidden_states",
    "lm_head",
    "output_transform",
    "unwrap",
]


def from_pretrained(model_class, path: str, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` with the model's own layers: no hub kernels.

    Since transformers 5.25, ``from_pretrained`` kernelizes by default: it swaps layers for kernels
    from the Hugging Face hub (fetched at run time, with their own numerics). Training and scoring
    here use the model's own forward, offline, so every load passes ``use_kernels=False``, the
    library's switch for it.
    """
    return model_class.from_pretrained(path, use_kernels=False, **kwargs)


class UnsupportedModelError(ValueError):
    """The model computes its logits in a way the fused-linear loss does not reproduce."""


class LMHead(NamedTuple):
    """The LM head as the fused-linear loss takes it: ``logits = f(hidden @ weight.T + bias)``."""

    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V] or None
    logit_scale: Optional[float] = None  # s in f (None: 1)
    logit_softcap: Optional[float] = None  # c in f (None: no cap)

    def loss_kwargs(self) -> Dict[str, Any]:
        """``bias``, ``logit_scale``, ``logit_softcap``: keywords of ``rf.fused_linear_ppo_loss`` / ``_logprobs``."""
        return {"bias": self.bias, "logit_scale": self.logit_scale, "logit_softcap": self.logit_softcap}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits ``f(hidden @ weight.T + bias)`` in plain PyTorch (the eager path; [..., V])."""
        z = hidden @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        return apply_transform(z, self.logit_scale, self.logit_softcap)


def apply_transform(z: torch.Tensor, scale: Optional[float], softcap: Optional[float]) -> torch.Tensor:
    """``f(z)``: ``z·s``, then ``c·tanh(z / c)`` (out of place, differentiable)."""
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _positive(value, what: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UnsupportedModelError(f"the model's config has {what} = {value!r}; only finite values > 0 are supported")
    return float(value)


def output_transform(config) -> Tuple[Optional[float], Optional[float]]:
    """``(logit_scale, logit_softcap)`` of a model's config (see the module table); None where absent.

    A scale of exactly 1 is reported as None (no transform).
    """
    text = _text_config(config)
    softcap = _positive(getattr(text, "final_logit_softcapping", None), "final_logit_softcapping")
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            scale = _positive(value, name)
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        value = _positive(text.logits_scaling, "logits_scaling")
        scale = value if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / value
    return (None if scale == 1.0 else scale), softcap


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise).

    Prompt-learning adapters (prompt / prefix / P-tuning) prepend virtual tokens in the
    wrapper's forward, which a direct call of the backbone skips: refused.
    """
    peft_config = getattr(model, "peft_config", None)
    get_base = getattr(model, "get_base_model", None)
    if peft_config is None or not callable(get_base):
        return model
    for name, cfg in dict(peft_config).items():
        if getattr(cfg, "is_prompt_learning", False):
            raise UnsupportedModelError(
                f"PEFT adapter {name!r} is a prompt-learning method ({type(cfg).__name__}): its virtual tokens are "
                "added by the PEFT wrapper's forward, which the fused-linear path bypasses; use a weight adapter "
                "such as LoRA"
            )
    return get_base()


def backbone(model: nn.Module) -> nn.Module:
    """The body of a causal LM (``model.base_model``): it returns ``last_hidden_state``, the LM head's input."""
    inner = unwrap(model)
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise UnsupportedModelError(
            f"{type(inner).__name__} has no separate backbone (base_model); the fused-linear path needs the hidden "
            "states before the LM head"
        )
    return body


def hidden_states(model: nn.Module, **inputs) -> torch.Tensor:
    """The last hidden states ``[B, T, H]`` of ``model``'s backbone for these inputs (``use_cache=False``)."""
    inputs.setdefault("use_cache", False)
    return backbone(model)(**inputs).last_hidden_state


def _head_module(inner: nn.Module, trust_head_forward: bool) -> nn.Linear:
    head = inner.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{type(inner).__name__} has no output embedding module (LM head)")
    if not isinstance(head, nn.Linear) or (type(head).forward is not nn.Linear.forward and not trust_head_forward):
        raise UnsupportedModelError(
            f"the LM head of {type(inner).__name__} is a {type(head).__module__}.{type(head).__name__}, not a plain "
            "torch.nn.Linear (an adapter, a quantised layer or a custom forward): its weight alone does not give "
            "the logits"
        )
    if "forward" in vars(head) and not trust_head_forward:
        raise UnsupportedModelError(
            f"the LM head of {type(inner).__name__} has its forward replaced on the instance; its weight alone may "
            "not give the logits"
        )
    if not head.weight.is_floating_point():
        raise UnsupportedModelError(f"the LM head weight has dtype {head.weight.dtype}; a float weight is needed")
    return head


def lm_head(model: nn.Module, *, verify: Union[bool, str] = True, trust_head_forward: bool = False) -> LMHead:
    """The LM head of ``model`` (tied or not, with its bias) and the transform of its logits.

    ``verify``: True runs :func:`check_output_layer` (one forward of three tokens); ``"auto"``
    runs it only when the head's weight is a materialised tensor (not on the meta device, not a
    sharded DTensor or a ZeRO-3 partition, where the forward cannot run here) and warns otherwise;
    False skips it. ``trust_head_forward``: the caller knows what a replaced head forward does
    (TRL's ``cast_lm_head_to_fp32`` computes the same linear map in fp32).
    """
    inner = unwrap(model)
    head = _head_module(inner, trust_head_forward)
    scale, softcap = output_transform(inner.config)
    result = LMHead(head.weight, head.bias, scale, softcap)
    if verify == "auto":
        why = _why_not_runnable(head.weight)
        if why is not None:
            warnings.warn(f"rlhf_fast: the output layer of {type(inner).__name__} was not checked ({why}); its logit "
                          f"transform is taken from the config (scale {scale}, soft-cap {softcap})", stacklevel=2)
            return result
        verify = True
    if verify:
        check_output_layer(inner, result)
    return result


def _why_not_runnable(weight: torch.Tensor) -> Optional[str]:
    if weight.device.type == "meta":
        return "its weights are on the meta device"
    if hasattr(weight, "ds_id"):
        return "its weights are DeepSpeed ZeRO-3 partitions"
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        return "its weights are sharded DTensors"
    return None


_PROBE_RANGE = 60.0


def _probe_values(shape: torch.Size, dtype: torch.dtype, device, softcap: Optional[float]) -> torch.Tensor:
    """Known head outputs: each position's row spans ±R (R beyond any soft-cap), shifted per position."""
    span = max(_PROBE_RANGE, 3.0 * softcap) if softcap is not None else _PROBE_RANGE
    vocab = shape[-1]
    row = torch.linspace(-span, span, vocab, dtype=torch.float64, device=device)
    positions = int(torch.Size(shape[:-1]).numel())
    shift = torch.arange(positions, dtype=torch.float64, device=device).remainder(7).mul(0.37).unsqueeze(-1)
    return (row + shift).reshape(shape).to(dtype)


def _tolerance(dtype: torch.dtype, magnitude: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-6
    return 8.0 * eps * (1.0 + magnitude)


@torch.no_grad()
def check_output_layer(model: nn.Module, head: LMHead, *, tokens: int = 3) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model(...).logits == f(lm_head(hidden_states(model, ...)))``.

    One forward of ``tokens`` tokens in eval mode (the training mode is restored): a forward hook
    replaces the head's output by known values z and the model's logits must be ``f(z)``, with f
    from ``head``; a pre-hook records the head's input, which must equal :func:`hidden_states`.
    """
    inner = unwrap(model)
    module = inner.get_output_embeddings()
    device = head.weight.device
    embeddings = inner.get_input_embeddings() if callable(getattr(inner, "get_input_embeddings", None)) else None
    n_ids = getattr(embeddings, "num_embeddings", None) or head.weight.shape[0]
    ids = (torch.arange(1, tokens + 1, device=device) % n_ids).unsqueeze(0)
    seen: Dict[str, torch.Tensor] = {}

    def before(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen["input"] = x.detach().clone()

    def after(_module, _args, _kwargs, output):
        seen["probe"] = _probe_values(output.shape, output.dtype, output.device, head.logit_softcap)
        return seen["probe"]

    handles = [module.register_forward_pre_hook(before, with_kwargs=True),
               module.register_forward_hook(after, with_kwargs=True)]
    was_training = inner.training
    inner.eval()
    try:
        out = inner(input_ids=ids, use_cache=False)
        body_hidden = hidden_states(inner, input_ids=ids) if "probe" in seen else None
    finally:
        for handle in handles:
            handle.remove()
        inner.train(was_training)
    name = type(inner).__name__
    if "probe" not in seen:
        raise UnsupportedModelError(f"{name}'s forward never calls its output embedding module; the fused-linear "
                                    "path cannot know how it computes the logits")
    logits = out.logits if hasattr(out, "logits") else out[0]
    probe = seen["probe"]
    if logits.shape != probe.shape:
        raise UnsupportedModelError(f"{name}'s logits have shape {tuple(logits.shape)} but its LM head outputs "
                                    f"{tuple(probe.shape)}: the forward reshapes or slices them")
    expected = apply_transform(probe.double(), head.logit_scale, head.logit_softcap)
    dtype = logits.dtype if torch.finfo(logits.dtype).eps >= torch.finfo(probe.dtype).eps else probe.dtype
    err = (logits.double() - expected).abs()
    bad = err > _tolerance(dtype, expected.abs())
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise UnsupportedModelError(
            f"{name}'s forward turns the LM head's output z into logits in a way rlhf_fast does not reproduce: "
            f"expected f(z) with logit_scale={head.logit_scale}, logit_softcap={head.logit_softcap} (from the "
            f"config), but at z = {probe[tuple(where)].item():.4g} the model gives {logits[tuple(where)].item():.6g} "
            f"instead of {expected[tuple(where)].item():.6g}. Supported transforms: a scale (logit_scale, "
            "output_multiplier, lm_head_multiplier, logits_scaling) and a tanh soft-cap (final_logit_softcapping)"
        )
    head_input = seen["input"].double()
    same = body_hidden is not None and body_hidden.shape == head_input.shape and not (
        (body_hidden.double() - head_input).abs() > _tolerance(seen["input"].dtype, head_input.abs())).any()
    if not same:
        raise UnsupportedModelError(
            f"the input of {name}'s LM head is not its backbone's last hidden state (the forward transforms the "
            "hidden states between them); the fused-linear path would score different logits"
        )
