# examples/hf_loss_step.py: the fused PPO loss in an existing training step of a Hugging Face causal LM.
import copy

import torch
import transformers

import rlhf_fast as rf

torch.manual_seed(0)
# Your policy: AutoModelForCausalLM.from_pretrained(...); a tiny random GPT-2 here, so this runs anywhere.
config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_layer=2, n_embd=32, n_head=2, bos_token_id=1,
                                 eos_token_id=1)
policy = transformers.GPT2LMHeadModel(config)
policy.eval()  # dropout off, as PPO implementations do: the first update's ratio is exactly 1
ref_policy = copy.deepcopy(policy)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)

# A rollout of two sequences: prompt tokens, then the sampled response, then right padding (id 0).
input_ids = torch.tensor([[5, 6, 7, 8, 20, 21, 22, 0, 0],
                          [9, 10, 11, 23, 24, 25, 26, 27, 0]])
prompt_len = torch.tensor([[4], [3]])
seq_len = torch.tensor([[7], [8]])                     # prompt + response
position = torch.arange(input_ids.shape[1])
attention_mask = (position < seq_len).long()
response_mask = (position >= prompt_len) & (position < seq_len)   # [B, L]: True on response tokens

# logits[:, t] predicts input_ids[:, t + 1]: drop the last logit and the first token, and train on
# a token only if it is a response token (never the prompt, never padding).
targets = input_ids[:, 1:]                             # [B, L-1]
mask = response_mask[:, 1:]                            # [B, L-1]

with torch.no_grad():                                  # rollout time: behaviour and reference log-probs
    old_logprobs = rf.logprobs(policy(input_ids, attention_mask=attention_mask).logits[:, :-1], targets, mask)
    ref_logprobs = rf.logprobs(ref_policy(input_ids, attention_mask=attention_mask).logits[:, :-1], targets, mask)
advantages = torch.tensor([1.0, -0.5])                 # one per sequence ([B]), or one per token ([B, L-1])

# The training step.
logits = policy(input_ids, attention_mask=attention_mask).logits                      # [B, L, V]
out = rf.ppo_loss(logits[:, :-1], targets, advantages, old_logprobs, ref_logprobs, mask,
                  clip_eps=0.2, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
optimizer.zero_grad()
out.loss.backward()
optimizer.step()
print(f"loss {out.loss.item():.4f}, ratio_above {out.metrics['ratio_above'].item():.3f}, "
      f"kl {out.metrics['kl'].item():.2e}")

# The alignment, by hand: out.logprobs[b, t] = log p(input_ids[b, t + 1] | input_ids[b, : t + 1]), 0 off the mask.
by_hand = logits[:, :-1].detach().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
assert torch.allclose(out.logprobs, torch.where(mask, by_hand, 0.0), atol=1e-5)
assert torch.allclose(out.logprobs, old_logprobs, atol=1e-6)  # same weights as at rollout time: ratio 1
