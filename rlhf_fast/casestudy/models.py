"""The tiny policy, its supervised fine-tuning, sampling and evaluation of a policy.

All models are built from a config (no download). Sequences are ``prompt (5 tokens) +
reply``; replies are right-padded with PAD after EOS.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import rlhf_fast as rf
from rlhf_fast import training

from . import world


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny GPT-2 used for the policy, the reference and the reward model (``GPT2Config`` fields)."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 32


def build_policy(cfg: ModelConfig):
    """A randomly initialised GPT-2 LM over the world's vocabulary, dropout off (PPO ratios need it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        **dataclasses.asdict(cfg),
        vocab_size=world.VOCAB_SIZE,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=world.BOS,
        eos_token_id=world.EOS,
        pad_token_id=world.PAD,
    )
    model = GPT2LMHeadModel(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = world.BOS, world.EOS, world.PAD
    return model


def pad_right(seqs: Sequence[Sequence[int]], length: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[N, L]`` with PAD on the right; L = max(longest, ``length``)."""
    width = max([len(s) for s in seqs] + [length])
    ids = torch.full((len(seqs), width), world.PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass(frozen=True)
class SFTConfig:
    examples: int = 6000
    """Demonstrations drawn from :func:`world.sft_dataset`."""
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3


def supervised_finetune(model, data: List[List[int]], cfg: SFTConfig, progress=None) -> List[float]:
    """Next-token cross-entropy on the reply tokens (the prompt is context only). Returns losses."""
    ids, mask = pad_right(data)
    labels = ids.clone()
    labels[:, : world.PROMPT_LEN] = -100
    labels[mask == 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data))
        for start in range(0, len(data), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = model(input_ids=ids[idx], attention_mask=mask[idx]).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[idx, 1:].reshape(-1), ignore_index=-100
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def sample_replies(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0, batch_size: int = 256
) -> List[List[int]]:
    """One sampled reply per prompt (up to and including EOS, no padding). Uses torch's global RNG."""
    model.eval()
    samples = training.sample_replies(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=world.EOS,
        pad_token_id=world.PAD, batch_size=batch_size,
    )
    return samples.replies()


@torch.no_grad()
def reply_logprob_sums(
    model, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], temperature: float = 1.0
) -> torch.Tensor:
    """Σ_t log π(reply_t | prefix) over each reply's tokens ``[N]`` at temperature τ."""
    ids, mask = pad_right([list(p) + list(r) for p, r in zip(prompts, replies, strict=True)])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    reply_mask = mask[:, 1:].bool()
    reply_mask[:, : world.PROMPT_LEN - 1] = False
    lp = rf.logprobs(logits, ids[:, 1:], reply_mask, temperature=temperature, backend="eager")
    return lp.sum(dim=1)


@torch.no_grad()
def reward_scores(reward_model, prompts, replies, batch_size: int = 512) -> torch.Tensor:
    """Raw reward-model scores ``[N]`` of prompt + reply."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], replies[start : start + batch_size]
        ids, mask = pad_right([list(p) + list(r) for p, r in zip(ps, rs, strict=True)])
        out.append(reward_model(ids, mask).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_policy(
    policy,
    reference,
    reward_model,
    prompts: Sequence[Sequence[int]],
    gold: world.GoldJudge,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> Dict[str, float]:
    """Sample one reply per prompt and measure proxy, gold, KL to the reference and behaviour.

    ``proxy_reward`` is the normalised reward-model score (0 on reference samples by
    construction of the calibration); ``kl`` is the per-sequence sum of
    log π − log π_ref over the sampled reply (k1, an unbiased estimate of the sequence KL).
    """
    torch.manual_seed(seed)
    replies = sample_replies(policy, prompts, max_new_tokens, temperature)
    scores = reward_scores(reward_model, prompts, replies)
    kl = reply_logprob_sums(policy, prompts, replies, temperature) - reply_logprob_sums(
        reference, prompts, replies, temperature
    )
    stats = world.behaviour(prompts, replies, gold)
    stats.update(
        proxy_reward=float(reward_model.normalize(scores).mean()),
        proxy_raw=float(scores.mean()),
        kl=float(kl.mean()),
    )
    return stats


def probe_correlations(reward_model, gold: world.GoldJudge, cfg: world.WorldConfig, n: int, seed: int):
    """Correlation of the RM score (and, for contrast, of gold) with reply length and upsell count.

    Measured on fresh well-formed candidate replies to safe prompts (the labellers'
    distribution without stray tokens, off-format starts or missing EOS).
    """
    import dataclasses

    cfg = dataclasses.replace(cfg, pair_stray=0.0, pair_off_format=0.0, pair_missing_eos=0.0)
    rng = random.Random(seed)
    prompts = world.sample_prompts(n, rng, 0.0)
    replies = [world.candidate_reply(p, cfg, rng) for p in prompts]
    scores = reward_scores(reward_model, prompts, replies).tolist()
    parsed = [world.parse_reply(r) for r in replies]
    lengths = [p.length for p in parsed]
    salesy = [p.n_salesy for p in parsed]
    golds = [gold(p, r) for p, r in zip(prompts, replies, strict=True)]
    return {
        "rm_corr_length": training.pearson(scores, lengths),
        "rm_corr_salesy": training.pearson(scores, salesy),
        "gold_corr_length": training.pearson(golds, lengths),
        "gold_corr_salesy": training.pearson(golds, salesy),
        "rm_corr_gold": training.pearson(scores, golds),
    }
