# examples/train_ppo.py: a reward model, its calibration, and PPO with normalised rewards and a KL budget.
import copy

import torch
import transformers

import rlhf_fast as rf
from rlhf_fast.training import sample_replies

torch.manual_seed(0)
# Your models: AutoModelForCausalLM.from_pretrained(...) for the policy (the SFT model) and the reward
# model's backbone; tiny random GPT-2s here, so this runs anywhere in seconds.
config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_layer=2, n_embd=32, n_head=2, bos_token_id=1,
                                 eos_token_id=1)
EOS = PAD = 1
policy = transformers.GPT2LMHeadModel(config)          # PPO updates it in place
ref_policy = copy.deepcopy(policy)                     # the frozen reference
reward_model = rf.RewardModel(transformers.GPT2Model(config))
prompts = [torch.randint(2, 64, (n,)).tolist() for n in (3, 4, 5, 6) * 4]   # token-id lists

# 1. Bradley–Terry training on preference pairs [N, L] (chosen, rejected); random pairs here.
chosen, rejected = torch.randint(2, 64, (64, 8)), torch.randint(2, 64, (64, 8))
ones = torch.ones_like(chosen)
rf.train_reward_model(reward_model, chosen, ones, rejected, ones, rf.RewardTrainConfig(epochs=1, progress=False))

# 2. Calibration: the score mean and std on the reference policy's replies (what reward_normalize uses),
#    sampled at the temperature and length limit of the PPO run.
cfg = rf.PPOConfig(steps=3, batch=4, samples_per_prompt=2, minibatch_size=4, max_new_tokens=8, temperature=1.0,
                   adaptive_kl=True, kl_target=6.0, kl_coef=0.1, reward_normalize=True, out_dir="runs/example_ppo",
                   progress=False)
samples = sample_replies(ref_policy, prompts * 4, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         eos_token_id=EOS, pad_token_id=PAD)
mean, std = rf.calibrate(reward_model, samples.input_ids, samples.attention_mask)
print(f"reward model on reference replies: mean {mean:.3f}, std {std:.3f}")

# 3. PPO: every step's diagnostics go to runs/example_ppo/metrics.jsonl.
records = rf.train_ppo(cfg, policy, ref_policy, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD)
last = records[-1].metrics
print(f"step {records[-1].step}: normalised score {last['score_norm_mean']:+.3f}, "
      f"KL to the reference {last['kl_ref_k1_sum']:.3f} nats/reply, next beta {last['kl_coef_next']:.3f}")
