"""Reward model: a ``transformers`` backbone plus a scalar head, trained with Bradley–Terry.

A Bradley–Terry model only learns score *differences*: its offset and scale are
arbitrary. :func:`calibrate` measures mean and std of the scores on reference-policy
samples and stores them with the model, so PPO can use normalised rewards (mean 0,
std 1 under the reference) and a KL coefficient keeps its meaning.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_save, atomic_write_text
from .checkpoint import load as load_without_code
from .hf_models import from_pretrained


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, L]`` counting valid tokens only, so left padding does not shift them.

    Padding positions get 0 (they are masked out anyway); ``generate`` does the same.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of the last valid token of each row, for left, right or mixed padding.

    A row without any valid token gets index 0.
    """
    length = attention_mask.shape[-1]
    flipped_first = attention_mask.bool().flip(-1).long().argmax(dim=-1)
    return (length - 1 - flipped_first) * attention_mask.bool().any(dim=-1).long()


class RewardModel(nn.Module):
    """``backbone`` (any ``transformers`` model, with or without an LM head) + a linear scalar head.

    The score of a sequence is the head applied to the final hidden state at its last
    non-padding token (the head stays fp32 under a low-precision backbone). Buffers
    ``score_mean`` / ``score_std`` (0 and 1 until :func:`calibrate`) travel with
    ``state_dict`` and :func:`save_reward_model`.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden_size = backbone.config.hidden_size
        self.head = nn.Linear(hidden_size, 1)
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    @property
    def is_calibrated(self) -> bool:
        return not (float(self.score_mean) == 0.0 and float(self.score_std) == 1.0)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Final hidden states ``[B, L, H]`` of the backbone's body (the LM head is skipped)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        body = getattr(self.backbone, "base_model", self.backbone)
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The head at every position ``[B, L]`` (what a critic initialised from the RM reads)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Raw scores ``[B]`` read at the last non-padding token of each row."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        last = last_token_index(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last].to(self.head.weight.dtype)).squeeze(-1)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores − score_mean) / score_std``: mean 0, std 1 on the calibration samples."""
        return (scores - self.score_mean) / self.score_std


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Pairwise loss ``mean(−logsigmoid(r_c − r_r − margin)) + c·mean((r_c + r_r)²)``.

    chosen, rejected: ``[B]`` scores; margin: ``[B]`` or a number (None = 0). The centring
    term (Eisenstein et al. 2023) pins the arbitrary offset of the scores near 0.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


@dataclass
class RewardTrainConfig:
    """Settings of :func:`train_reward_model`."""

    lr: float = 1e-4
    """AdamW learning rate."""
    epochs: int = 3
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimiser step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    center_coef: float = 0.0
    """c of the centring term c·mean((r_c + r_r)²); 0 disables it."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (0 or less disables it)."""
    seed: int = 0
    """Seed of the held-out split and of the shuffling."""
    progress: bool = True
    """Show a tqdm progress bar."""


def _pair_stats(model: RewardModel, ids_c, mask_c, ids_r, mask_r, margins, cfg, batch_size) -> Tuple[float, float]:
    """Mean loss and accuracy (ties count ½) over pairs, without gradients."""
    total_loss, total_acc, n = 0.0, 0.0, ids_c.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            chosen = model(ids_c[sl], mask_c[sl])
            rejected = model(ids_r[sl], mask_r[sl])
            margin = None if margins is None else margins[sl]
            loss = bradley_terry_loss(chosen, rejected, margin, cfg.center_coef)
            total_loss += float(loss) * chosen.shape[0]
            total_acc += float((chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum())
    return total_loss / n, total_acc / n


def train_reward_model(
    model: RewardModel,
    chosen_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_ids: torch.Tensor,
    rejected_mask: torch.Tensor,
    cfg: Optional[RewardTrainConfig] = None,
    heldout_fraction: float = 0.1,
    margins: Optional[torch.Tensor] = None,
) -> Dict[str, object]:
    """Fit ``model`` on preference pairs with :func:`bradley_terry_loss`.

    chosen_ids / chosen_mask: ``[N, Lc]``; rejected_ids / rejected_mask: ``[N, Lr]``
    (left or right padded); margins: optional ``[N]``. A random ``heldout_fraction`` of
    the pairs is kept out of training. Returns ``train_loss`` and ``train_accuracy``
    (last epoch, running), ``heldout_loss`` and ``heldout_accuracy`` (NaN when nothing
    is held out) and a per-epoch ``history``. The model is left in eval mode.
    """
    from tqdm.auto import tqdm

    cfg = cfg or RewardTrainConfig()
    n = chosen_ids.shape[0]
    if not (rejected_ids.shape[0] == chosen_mask.shape[0] == rejected_mask.shape[0] == n):
        raise ValueError("chosen/rejected ids and masks must have the same number of pairs")
    if chosen_ids.shape != chosen_mask.shape or rejected_ids.shape != rejected_mask.shape:
        raise ValueError("each ids tensor must have the shape of its mask")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if cfg.batch_size < 1 or cfg.epochs < 0:
        raise ValueError("batch_size must be >= 1 and epochs >= 0")
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=generator)
    n_heldout = int(round(n * heldout_fraction))
    heldout, train_idx = order[:n_heldout], order[n_heldout:]

    def take(idx):
        m = None if margins is None else margins[idx]
        return chosen_ids[idx], chosen_mask[idx], rejected_ids[idx], rejected_mask[idx], m

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="reward model", disable=not cfg.progress)
    train_loss = train_acc = float("nan")
    for epoch in range(cfg.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        loss_sum, acc_sum = 0.0, 0.0
        for start in range(0, len(perm), cfg.batch_size):
            ids_c, mask_c, ids_r, mask_r, margin = take(perm[start : start + cfg.batch_size])
            chosen = model(ids_c, mask_c)
            rejected = model(ids_r, mask_r)
            loss = bradley_terry_loss(chosen, rejected, margin, cfg.center_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            loss_sum += float(loss.detach()) * chosen.shape[0]
            acc_sum += float((chosen.detach() > rejected.detach()).float().sum())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        train_loss, train_acc = loss_sum / max(len(perm), 1), acc_sum / max(len(perm), 1)
        model.eval()
        heldout_loss, heldout_acc = _pair_stats(model, *take(heldout), cfg, cfg.batch_size)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
             "heldout_loss": heldout_loss, "heldout_accuracy": heldout_acc}
        )
        bar.set_postfix(loss=f"{train_loss:.4f}", heldout_acc=f"{heldout_acc:.3f}")
    bar.close()
    model.eval()
    heldout_loss, heldout_acc = _pair_stats(model, *take(heldout), cfg, cfg.batch_size)
    return {
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "heldout_loss": heldout_loss,
        "heldout_accuracy": heldout_acc,
        "num_train": len(train_idx),
        "num_heldout": n_heldout,
        "history": history,
    }


@torch.no_grad()
def calibrate(
    model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64
) -> Tuple[float, float]:
    """Score ``input_ids [N, L]`` (reference-policy samples) and store their mean and std.

    Afterwards ``model.normalize(scores)`` has mean 0 and std 1 on these samples.
    Returns ``(mean, std)``; std is floored at 1e-6.
    """
    if input_ids.shape[0] < 2:
        raise ValueError("calibrate needs at least 2 samples to estimate a std")
    was_training = model.training
    model.eval()
    scores = torch.cat(
        [model(input_ids[s : s + batch_size], attention_mask[s : s + batch_size])
         for s in range(0, input_ids.shape[0], batch_size)]
    ).float()
    mean, std = float(scores.mean()), max(float(scores.std()), 1e-6)
    model.score_mean.fill_(mean)
    model.score_std.fill_(std)
    model.train(was_training)
    return mean, std


_HEAD_FILE = "reward_head.pt"
_META_FILE = "reward_model.json"


def save_reward_model(model: RewardModel, path: str) -> None:
    """Write the backbone (``save_pretrained``), the head and the calibration to directory ``path``."""
    os.makedirs(path, exist_ok=True)
    model.backbone.save_pretrained(path)
    state = {"head": model.head.state_dict(), "score_mean": model.score_mean, "score_std": model.score_std}
    atomic_save(state, os.path.join(path, _HEAD_FILE))
    meta = {"backbone_class": type(model.backbone).__name__,
            "score_mean": float(model.score_mean), "score_std": float(model.score_std)}
    atomic_write_text(json.dumps(meta, indent=2), os.path.join(path, _META_FILE))


def load_reward_model(path: str) -> RewardModel:
    """Inverse of :func:`save_reward_model` (on CPU, eval mode)."""
    import transformers

    with open(os.path.join(path, _META_FILE)) as f:
        meta = json.load(f)
    backbone_cls = getattr(transformers, meta["backbone_class"])
    model = RewardModel(from_pretrained(backbone_cls, path))
    state = load_without_code(os.path.join(path, _HEAD_FILE))  # tensors only: a crafted file is refused unread
    model.head.load_state_dict(state["head"])
    model.score_mean.copy_(state["score_mean"])
    model.score_std.copy_(state["score_std"])
    return model.eval()
