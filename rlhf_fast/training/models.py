"""What the loop needs from the models: the value head, hidden states, the LM head, log-probs.

Logits are ``f(lm_head(last_hidden_state))`` of the model's body, with ``f`` the output transform
of the model's config (identity for GPT-2, Llama, Mistral, Qwen; a scale for Cohere or Granite;
soft-capping for Gemma 2/3: :mod:`.hf_models`, checked once against the model's own forward by
:func:`check_compatibility`; other post-processing is refused there).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import loss as rf_loss
from .hf_models import apply_transform, check_output_layer, output_transform, unwrap
from .hf_models import lm_head as output_layer
from .records import Samples


class ValueHead(nn.Module):
    """Scalar head on the policy's final hidden state (zero-initialised: V ≡ 0 at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...] in the head's dtype (fp32)
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def response_hidden(model: nn.Module, samples: Samples, rows=None) -> torch.Tensor:
    """Final hidden states ``[B, R, H]`` at the positions that predict the reply tokens.

    Position ``P−1+t`` predicts reply token ``t``; the last input token is never needed.
    ``rows`` selects a minibatch.
    """
    ids, mask, pos = samples.input_ids, samples.attention_mask, samples.position_ids
    if rows is not None:
        ids, mask, pos = ids[rows], mask[rows], pos[rows]
    body = getattr(model, "base_model", model)
    out = body(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1])
    return out.last_hidden_state[:, samples.prompt_len - 1 :]


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to score tokens with")
    return head


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[..., V]`` from its final hidden states: the head, then its output transform."""
    z = lm_head(model)(hidden)
    scale, softcap = output_transform(unwrap(model).config)
    return z if scale is None and softcap is None else apply_transform(z, scale, softcap)


def fused_head(model: nn.Module) -> dict:
    """``weight`` and the keywords of ``rf.fused_linear_*`` that reproduce :func:`logits` from hidden states."""
    head = output_layer(model, verify=False)
    return {"weight": head.weight, **head.loss_kwargs()}


def token_logprobs(
    model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float,
    use_fused_linear: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy ``[B, R]`` of ``targets`` at temperature τ (no grad)."""
    if use_fused_linear:
        head = fused_head(model)
        return rf_loss.fused_linear_logprobs(hidden, head.pop("weight"), targets, mask, temperature=temperature,
                                             with_entropy=True, backend=backend, **head)
    return rf_loss.logprobs(logits(model, hidden), targets, mask, temperature=temperature, with_entropy=True,
                            backend=backend)


def critic_values(critic: nn.Module, hidden: torch.Tensor, samples: Samples, rows=None) -> torch.Tensor:
    """Values ``[B, R]`` of the states before each reply token.

    A :class:`ValueHead` reads the policy's ``hidden`` ``[B, R, H]``; a separate critic
    runs its own forward over the sequences (``rows`` selects a minibatch).
    """
    if isinstance(critic, ValueHead):
        return critic(hidden)
    ids, mask, pos = samples.input_ids, samples.attention_mask, samples.position_ids
    if rows is not None:
        ids, mask, pos = ids[rows], mask[rows], pos[rows]
    return critic.values(ids[:, :-1], mask[:, :-1], pos[:, :-1])[:, samples.prompt_len - 1 :]


def vocab_size(model: nn.Module) -> Optional[int]:
    model = getattr(model, "backbone", model)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return getattr(embeddings, "num_embeddings", None)


def check_compatibility(
    policy: nn.Module,
    ref_policy: nn.Module,
    reward_model: nn.Module,
    eos_token_id: int,
    pad_token_id: int,
    policy_tokenizer=None,
    reward_tokenizer=None,
) -> None:
    """Fail early when the models cannot share token ids (different tokenizers or vocabularies)."""
    if policy_tokenizer is not None and reward_tokenizer is not None:
        policy_vocab, reward_vocab = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
        if policy_vocab != reward_vocab:
            differing = sorted(set(policy_vocab.items()) ^ set(reward_vocab.items()))[:5]
            raise ValueError(
                "the policy and reward-model tokenizers differ (token ids would mean different things); "
                f"{len(policy_vocab)} vs {len(reward_vocab)} tokens, e.g. differing entries {differing}"
            )
    sizes = {name: vocab_size(m) for name, m in
             (("policy", policy), ("ref_policy", ref_policy), ("reward_model", reward_model))}
    if sizes["policy"] is not None and sizes["ref_policy"] is not None and sizes["policy"] != sizes["ref_policy"]:
        raise ValueError(
            f"policy and ref_policy have different vocabularies ({sizes['policy']} vs {sizes['ref_policy']} "
            "embeddings): the KL to the reference needs the same tokenizer"
        )
    if sizes["policy"] is not None and sizes["reward_model"] is not None and sizes["reward_model"] < sizes["policy"]:
        raise ValueError(
            f"the reward model's vocabulary ({sizes['reward_model']}) is smaller than the policy's "
            f"({sizes['policy']}): they use different tokenizers"
        )
    for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if not isinstance(token, int) or token < 0 or (sizes["policy"] is not None and token >= sizes["policy"]):
            raise ValueError(f"{name} must be a token id in [0, {sizes['policy']}), got {token!r}")
    for model in (policy, ref_policy):
        if hasattr(model, "get_output_embeddings") and hasattr(model, "config"):
            # the logits the loop computes (head, then the config's transform) must be the model's own
            check_output_layer(unwrap(model), output_layer(model, verify=False))
