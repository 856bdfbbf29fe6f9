"""Steps 1–5 of a PPO step: pick prompts, sample replies, score them, rewards and advantages.

:func:`collect_rollout` does the whole phase and returns a :class:`~.records.Rollout`;
under data parallelism each rank samples its share and the rollout comes back global
(:class:`~.distributed.DataParallel`), so rewards and advantages are computed as in one
process.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .advantages import ADVANTAGE_ESTIMATORS, whiten
from .models import critic_values, response_hidden, token_logprobs
from .records import Rollout, Samples
from .reward import position_ids_from_mask


class _PaddedDecodeWarning(logging.Filter):
    """Drops transformers' "pass an `attention_mask`" warning: :func:`sample_replies` passes one, and
    the warning fires only because a finished row's next decode input is the pad token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in str(record.msg)


logging.getLogger("transformers.modeling_utils").addFilter(_PaddedDecodeWarning())


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → ``(ids [N, L], mask [N, L])`` padded on the left (as ``generate`` wants)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def prompt_lists(prompts) -> List[List[int]]:
    """Prompts as token-id lists, from lists, a ``[N, L]`` tensor or ``(ids, mask)``."""
    if isinstance(prompts, (tuple, list)) and len(prompts) == 2 and all(isinstance(p, torch.Tensor) for p in prompts):
        ids, mask = prompts
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in prompts]
    return [list(map(int, p)) for p in prompts]


@torch.no_grad()
def sample_replies(
    policy: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    synced_gpus: bool = False,
    batch_size: Optional[int] = None,
    with_logprobs: bool = False,
) -> Samples:
    """One reply per prompt: ``generate`` with do_sample at τ, no top-k / top-p, up to max_new_tokens.

    Uses torch's global RNG. ``batch_size`` generates that many prompts at a time (in order);
    ``synced_gpus``: every rank runs forwards until all ranks are done (sharded parameters, FSDP2).
    ``with_logprobs``: also the sampler's own log-probs of the sampled tokens, from ``generate``'s
    processed scores (its KV-cached forwards: what an inference engine reports as rollout
    log-probs); this keeps a ``[B, V]`` score per generated token until the chunk is done.
    """
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    generation = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    synced = {"synced_gpus": True} if synced_gpus else {}
    step = batch_size or max(len(prompts), 1)
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    if with_logprobs:
        generation.output_scores, generation.return_dict_in_generate = True, True
    chunks, chunk_logprobs = [], []
    for start in range(0, len(prompts), step):
        ids, mask = prompt_ids[start : start + step], prompt_mask[start : start + step]
        out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=generation, **synced)
        sequences = out.sequences if with_logprobs else out
        reply = sequences[:, prompt_ids.shape[1] :]
        chunks.append(reply)
        if with_logprobs:  # scores: one [b, V] per step, the logits after every processor (÷ τ)
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
            chunk_logprobs.append(scores.gather(-1, reply[:, : scores.shape[1], None]).squeeze(-1))
    width = max(c.shape[1] for c in chunks)

    def padded(tensors, value):
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

    response = padded(chunks, pad_token_id)
    is_eos = response == eos_token_id
    has_eos = is_eos.any(dim=1)
    lengths = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, torch.full_like(has_eos, width, dtype=torch.long))
    response_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    response = torch.where(response_mask, response, torch.full_like(response, pad_token_id))
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    sampling_logprobs = None
    if with_logprobs:
        sampling_logprobs = torch.where(response_mask, padded(chunk_logprobs, 0.0), 0.0)
    return Samples(
        torch.cat([prompt_ids, response], dim=1), attention_mask, position_ids_from_mask(attention_mask),
        prompt_ids.shape[1], response, response_mask, lengths, has_eos, sampling_logprobs,
    )


def choose_prompts(prompts: List[List[int]], cfg, step: int) -> List[List[int]]:
    """The step's ``batch`` prompts, each repeated ``samples_per_prompt`` times (contiguously).

    Seeded by (seed, step) alone, so a resumed run picks the same prompts without extra state.
    """
    chooser = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    chosen = torch.randperm(len(prompts), generator=chooser)[: cfg.batch].tolist()
    return [prompts[i] for i in chosen for _ in range(cfg.samples_per_prompt)]


@torch.no_grad()
def collect_rollout(cfg, dp, ref_policy: nn.Module, reward_model: nn.Module, step_prompts: List[List[int]],
                    beta: float, eos_token_id: int, pad_token_id: int) -> Rollout:
    """Sample, score and compute advantages for one step (no gradients).

    The models should be in eval mode (the trainer sets it): with dropout on, the old
    log-probs would not match the update's first forward. ``dp`` (a
    :class:`~.distributed.DataParallel` or its one-process stand-in) runs this rank's share
    of ``step_prompts`` and returns the global rollout: rewards and advantages are computed
    on it as in one process.
    """
    if ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator).needs_critic and dp.models.critic is None:
        raise ValueError(f"advantage_estimator={cfg.advantage_estimator!r} needs a critic (a ValueHead or a value "
                         "model)")
    scored = dp.sample_and_score(sample_and_score, cfg, ref_policy, reward_model, dp.local_prompts(step_prompts),
                                 eos_token_id, pad_token_id)
    return rewards_and_advantages(cfg, dp.gather_rollout(scored, pad_token_id), beta)


def sample_and_score(
    policy: nn.Module, critic: Optional[nn.Module], cfg, ref_policy: nn.Module, reward_model: nn.Module,
    step_prompts: List[List[int]], eos_token_id: int, pad_token_id: int, synced_gpus: bool = False,
) -> Rollout:
    """Steps 1–3 on these prompts: replies, log-probs, values, reward-model scores.

    Returns a rollout whose reward and advantage fields are still ``None``.
    """
    # 1. sample replies at τ
    samples = sample_replies(policy, step_prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=synced_gpus,
                             with_logprobs=cfg.rollout_is != "none")
    response_ids, response_mask = samples.response_ids, samples.response_mask

    # 2. old / reference log-probs at the same τ, and values of the states before each token
    def logprobs(model, hidden):
        return token_logprobs(model, hidden, response_ids, response_mask, cfg.temperature, cfg.use_fused_linear,
                              cfg.loss_backend)

    hidden = response_hidden(policy, samples)
    old_logprobs, entropy = logprobs(policy, hidden)
    ref_logprobs, _ = logprobs(ref_policy, response_hidden(ref_policy, samples))
    values = critic_values(critic, hidden, samples) * response_mask if critic is not None else None

    # 3. score: reward model at the end (normalised if asked, in rewards_and_advantages)
    raw_scores = reward_model(samples.input_ids, samples.attention_mask).float()
    norm_scores = reward_model.normalize(raw_scores) if hasattr(reward_model, "normalize") else raw_scores
    return Rollout(samples, old_logprobs, ref_logprobs, entropy, values, raw_scores, norm_scores, *(None,) * 5)


def rewards_and_advantages(cfg, scored: Rollout, beta: float) -> Rollout:
    """Steps 3–5: shaped scores, per-token rewards, advantages (the rollout's last five fields)."""
    samples = scored.samples
    response_mask, lengths, has_eos = samples.response_mask, samples.lengths, samples.has_eos
    # 3. the score entering the reward: normalised if asked, minus penalties
    scores = scored.norm_scores if cfg.reward_normalize else scored.raw_scores
    scores = scores - cfg.missing_eos_penalty * (~has_eos).float() - cfg.length_penalty * lengths.float()

    # 4. per-token reward: −β·k1 to the reference (KL in the reward), plus the score at the last token
    k1 = (scored.old_logprobs - scored.ref_logprobs) * response_mask
    rewards = -(beta if cfg.kl_placement == "reward" else 0.0) * k1
    rows = torch.arange(len(lengths), device=rewards.device)
    rewards[rows, lengths - 1] += scores

    # 5. advantages: per token (GAE) or per reply (GRPO, RLOO), then whitening
    estimator = ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator, "advantage_estimator")
    raw_advantages, returns = estimator.compute(rewards, scored.values, response_mask, cfg)
    if not cfg.whiten:
        advantages = raw_advantages
    elif estimator.per_token:
        advantages = whiten(raw_advantages, response_mask)
    else:
        advantages = whiten(raw_advantages)
    return scored._replace(scores=scores, rewards=rewards, raw_advantages=raw_advantages, advantages=advantages,
                           returns=returns)
