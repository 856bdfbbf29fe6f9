# examples/loss_variants.py: differentiable log-probs, the policy-loss variants, rollout correction, packing.
import torch

import rlhf_fast as rf

torch.manual_seed(0)
B, T, V = 2, 5, 100
logits = torch.randn(B, T, V, requires_grad=True)     # policy logits already shifted: [:, t] scores targets[:, t]
targets = torch.randint(0, V, (B, T))
mask = torch.ones(B, T, dtype=torch.bool)
advantages = torch.tensor([1.0, -1.0])
old = rf.logprobs(logits.detach(), targets, mask) + 0.05 * torch.randn(B, T)   # behaviour policy (trainer)
rollout = old + 0.01 * torch.randn(B, T)                                        # inference engine's log-probs

# rf.logprobs is differentiable: build any loss on it (here SFT), still no [N, V] log-softmax kept for backward.
lp = rf.logprobs(logits, targets, mask)
(-lp.sum() / mask.sum()).backward()

# Policy-loss variants, with the same call and every backend.
for options in (dict(policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4),    # sequence-level ratio
                dict(policy_loss="cispo", clip_eps_high=4.0),                   # clipped IS weight · A · lp
                dict(policy_loss="sapo")):                                      # soft sigmoid gate
    out = rf.ppo_loss(logits, targets, advantages, old, None, mask, **options)
    print(options["policy_loss"], f"{out.loss.item():+.4f}")

# Rollout importance correction: the trainer's old log-probs vs the inference engine's sampling log-probs.
out = rf.ppo_loss(logits, targets, advantages, old, None, mask, rollout_logprobs=rollout, rollout_is="truncate",
                  rollout_is_max=2.0)

# Packed sequences: one row of tokens, sequence boundaries in cu_seqlens (here lengths 3, 4 and 3).
packed_logits, packed_targets = logits.reshape(B * T, V), targets.reshape(B * T)
cu_seqlens = torch.tensor([0, 3, 7, 10])
out = rf.ppo_loss(packed_logits, packed_targets, torch.tensor([1.0, -1.0, 0.5]), old.reshape(-1), None,
                  cu_seqlens=cu_seqlens, loss_agg="seq-mean-token-mean")
out.loss.backward()
print("packed", f"{out.loss.item():+.4f}")
