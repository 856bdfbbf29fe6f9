"""Which tokens carry the KL: a running top-k of the KL to the reference summed per token id.

The KL to the reference per reply is a sum over the reply's tokens of ``log π(y_t) − log π_ref(y_t)``
(k1, on the sampled tokens). Grouping that sum by the sampled token's id says what the policy is
learning: in the case study's incident the upsell tokens carry most of it long before the
evaluation sees the salesy tone. :class:`TokenKL` keeps, for the last ``window`` steps, each
token id's KL per reply (its share of the step's KL per reply) and ranks the ids by the sum.
Trainers that have per-token log-probs of the policy and the reference feed it
(:func:`token_kl_sums` turns the tensors into the per-id sums).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, List, Mapping, NamedTuple, Optional


class TokenShare(NamedTuple):
    token_id: int
    kl: float
    """KL per reply carried by this token id, averaged over the window's steps (nats)."""
    share: float
    """Its share of the KL carried by the ids whose KL is positive (k1 of a sampled token can be negative)."""


class TokenKL:
    """Running sums of the KL per reply carried by each token id over the last ``window`` steps."""

    def __init__(self, window: int = 10, top_k: int = 5, decode: Optional[Callable[[int], str]] = None):
        if window < 1 or top_k < 1:
            raise ValueError(f"window and top_k must be >= 1, got window={window}, top_k={top_k}")
        self.window, self.top_k, self.decode = window, top_k, decode
        self._steps: Deque[Dict[int, float]] = deque(maxlen=window)

    def add(self, per_reply: Mapping[int, float]) -> None:
        """One step's KL per reply carried by each token id (``{id: Σ k1 over its occurrences / replies}``)."""
        self._steps.append({int(k): float(v) for k, v in per_reply.items()})

    def __bool__(self) -> bool:
        return bool(self._steps)

    def top(self, k: Optional[int] = None) -> List[TokenShare]:
        """The ``k`` ids carrying the most KL over the window (by their mean KL per reply)."""
        totals: Dict[int, float] = {}
        for step in self._steps:
            for token, value in step.items():
                totals[token] = totals.get(token, 0.0) + value
        n = max(len(self._steps), 1)
        whole = sum(v for v in totals.values() if v > 0)
        ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[: k or self.top_k]
        return [TokenShare(t, v / n, v / whole if whole > 0 else 0.0) for t, v in ranked]

    def name(self, token_id: int) -> str:
        if self.decode is None:
            return f"token {token_id}"
        try:
            return repr(self.decode(token_id))
        except Exception:  # a decode that fails on one id must not take the training run down
            return f"token {token_id}"

    def describe(self, k: int = 3) -> str:
        """``"'UPGRADE' 0.82 nats (31%), 'DEAL' 0.51 nats (19%), ..."`` (empty without data)."""
        parts = [f"{self.name(s.token_id)} {s.kl:.2f} nats ({s.share:.0%})" for s in self.top(k) if s.kl > 0]
        return ", ".join(parts)


def token_kl_sums(logprobs, ref_logprobs, token_ids, mask) -> Dict[int, float]:
    """``{token id: Σ (logprobs − ref_logprobs) over its sampled occurrences / number of replies}``.

    ``[B, T]`` tensors (``mask`` bool, True on reply tokens); the values sum to the step's KL per
    reply (k1). One pass over the tokens (a weighted ``bincount``) and one host transfer of the ids
    that occur and their sums.
    """
    import torch

    mask = mask.bool()
    ids = token_ids[mask].long()
    k1 = (logprobs.float() - ref_logprobs.float())[mask].double()
    if ids.numel() == 0:
        return {}
    sums = torch.bincount(ids, weights=k1)
    seen = torch.bincount(ids).nonzero().squeeze(1)
    replies = max(int(mask.shape[0]), 1)
    return {int(t): float(s) / replies for t, s in zip(seen.tolist(), sums[seen].tolist(), strict=True)}
