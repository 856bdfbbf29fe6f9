"""``python -m rlhf_fast calibrate``: calibrate a saved reward model on its reference policy's replies.

A Bradley–Terry reward model learns score differences only; PPO's ``--reward-normalize``
needs the mean and std of its scores under the reference policy (:func:`~.reward.calibrate`).
This command samples ``--samples`` replies from the reference policy (the policy PPO starts
from and measures KL against) to the prompts, at the temperature and length limit the PPO run
will use, scores them, stores the mean and std with the reward model and saves it, in place
or to ``--out``. Every input is checked first, as for ``ppo`` (:mod:`.cli_inputs`).

The save goes through a temporary directory beside the target and replaces the files one
atomic rename at a time, the head (which holds the calibration) last but for its JSON
summary, so an interrupted run leaves the previous calibration or the new one, never a
half-written file.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from typing import List

import torch

from .cli import POLICY_HELP, PROMPTS_HELP, REWARD_MODEL_HELP, compatible, load_causal_lm, load_reward
from .cli_inputs import (
    InputError,
    check_lm_directory,
    check_reward_model_directory,
    fail,
    positive,
    read_prompts,
    special_tokens,
)
from .config import PPOConfig
from .reward import _HEAD_FILE, _META_FILE, calibrate, save_reward_model

_DEFAULTS = {f: PPOConfig.__dataclass_fields__[f].default for f in ("max_new_tokens", "temperature", "seed")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward-model", required=True, help=f"{REWARD_MODEL_HELP}; calibrated in place unless --out")
    parser.add_argument("--policy", required=True,
                        help=f"the reference policy: {POLICY_HELP} (the policy PPO starts from, its --ref-policy)")
    parser.add_argument("--prompts", required=True, help=PROMPTS_HELP)
    parser.add_argument("--samples", type=int, default=512,
                        help="replies to score, one per prompt, the prompts cycled in a seeded order (default: 512)")
    parser.add_argument("--max-new-tokens", type=int, default=_DEFAULTS["max_new_tokens"],
                        help="length limit of a reply; use the PPO run's (default: %(default)s, as ppo's)")
    parser.add_argument("--temperature", type=float, default=_DEFAULTS["temperature"],
                        help="sampling temperature; use the PPO run's (default: %(default)s, as ppo's)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="seed of the prompt order and sampling")
    parser.add_argument("--batch-size", type=int, default=64, help="replies per generate / scoring call")
    parser.add_argument("--eos-token-id", type=int, default=None, help="default: the policy config's eos_token_id")
    parser.add_argument("--pad-token-id", type=int, default=None, help="default: the policy config's, else EOS")
    parser.add_argument("--out", default=None, help="directory for the calibrated reward model (default: in place)")


def cycled_prompts(prompts: List[List[int]], count: int, seed: int) -> List[List[int]]:
    """``count`` prompts: seeded random permutations of all of them, one after another (each used evenly)."""
    generator = torch.Generator().manual_seed(seed)
    chosen: List[List[int]] = []
    while len(chosen) < count:
        chosen += [prompts[i] for i in torch.randperm(len(prompts), generator=generator).tolist()]
    return chosen[:count]


def save_replacing(model, out: str, source: str) -> None:
    """Save ``model`` to ``out`` through a temporary directory beside it, one atomic rename per file.

    Files of ``source`` that the save does not write (e.g. a tokenizer) are copied along when
    ``out`` is another directory. The head file (the calibration) is renamed after the
    backbone's files and before ``reward_model.json``.
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.calibrating-")
    try:
        save_reward_model(model, staging)
        if os.path.abspath(source) != out:
            for name in os.listdir(source):
                src = os.path.join(source, name)
                if os.path.isfile(src) and not os.path.exists(os.path.join(staging, name)):
                    shutil.copy2(src, os.path.join(staging, name))
        os.makedirs(out, exist_ok=True)
        last = (_HEAD_FILE, _META_FILE)
        names = sorted(os.listdir(staging), key=lambda n: (last.index(n) + 1 if n in last else 0, n))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(args) -> int:
    """Sample from the reference policy, calibrate, save; prints the measured mean and std."""
    from .rollout import sample_replies
    from .seeding import seed_everything

    try:
        positive(args.samples, "--samples")
        if args.samples < 2:
            raise InputError(f"--samples must be at least 2 (a std needs two scores), got {args.samples}")
        positive(args.max_new_tokens, "--max-new-tokens")
        positive(args.temperature, "--temperature", integer=False)
        positive(args.batch_size, "--batch-size")
        out = args.out if args.out is not None else args.reward_model
        if os.path.exists(out) and not os.path.isdir(out):
            raise InputError(f"--out {out} is a file; pass a directory")
        policy_info = check_lm_directory(args.policy, "--policy")
        meta = check_reward_model_directory(args.reward_model)
        prompts = read_prompts(args.prompts, policy_info.vocab_size)
        eos, pad = special_tokens(args.eos_token_id, args.pad_token_id, policy_info)
        policy = load_causal_lm(args.policy, "--policy")
        reward_model = load_reward(args.reward_model)
        compatible(policy, policy, reward_model, eos, pad)
    except InputError as exc:
        return fail("calibrate", exc)
    policy.eval()
    seed_everything(args.seed)
    samples = sample_replies(policy, cycled_prompts(prompts, args.samples, args.seed),
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, eos_token_id=eos,
                             pad_token_id=pad, batch_size=args.batch_size)
    mean, std = calibrate(reward_model, samples.input_ids, samples.attention_mask, batch_size=args.batch_size)
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 1e-6:
        return fail("calibrate", InputError(
            f"the reward model's scores on these replies have mean {mean} and std {std}: they cannot normalise "
            "rewards (not finite, or every reply scores the same); nothing was saved"))
    save_replacing(reward_model, out, args.reward_model)
    previous = ""
    if meta.get("score_mean", 0.0) != 0.0 or meta.get("score_std", 1.0) != 1.0:
        previous = f" (was mean {meta.get('score_mean'):.6g}, std {meta.get('score_std'):.6g})"
    print(f"reward-model scores on {args.samples} replies of {args.policy} (mean length "
          f"{float(samples.lengths.float().mean()):.2f} tokens): mean {mean:.6g}, std {std:.6g}{previous}")
    print(f"saved the calibrated reward model to {out}; `python -m rlhf_fast ppo --reward-normalize` now scores "
          "(score - mean) / std")
    return 0
