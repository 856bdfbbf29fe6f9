"""Data-parallel PPO on torch.distributed (gloo, CPU) vs one process.

* The update: every rank builds the same global rollout (seeded, one process's
  ``collect_rollout``); the one-process ``ppo_update`` and the data-parallel one (DDP, and
  FSDP2) on it must give the same diagnostics, weights and last gradients.
* Checkpoints: runs of 2 and 1 processes, checkpointed and resumed under the other world
  size, must continue as the uninterrupted runs do (records, controller, step, weights).

``generate`` samples a batch from one RNG stream, so the same prompts split over a
different number of ranks get different replies: the end-to-end runs replace
``sample_replies`` by a deterministic function of the prompt (everything after sampling is
real), and the update test feeds both sides the same rollout.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import closing_process_group

pytest.importorskip("transformers")

# Metrics compared across world sizes: everything after sampling is equal up to summation order.
RTOL, ATOL = 1e-5, 1e-6
# After 12 AdamW steps of lr 3e-3 (≈ 4e-2 of total movement): Adam divides by √v, so summation-order
# noise in near-zero gradient elements moves weights by more than the gradients differ (measured:
# ≤ 2.5e-5; a lost optimizer state or a repeated step moves them by O(lr) = 3e-3).
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


def _setup(rank: int, world: int, init_file: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _sgd(policy, critic):
    """SGD: the weight change is linear in the gradient, so the weights compare at gradient precision
    (Adam divides by √v and turns summation-order noise in near-zero gradients into O(lr) steps)."""
    params = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    return torch.optim.SGD(params, lr=0.1)


UPDATE_CASES = {
    # GAE with a value head on the policy, token-mean, KL in the reward, entropy bonus
    "gae-valuehead": dict(advantage_estimator="gae", entropy_coef=0.01, kl_coef=0.1),
    # GRPO, seq-mean-token-mean, KL in the loss (k3), clip-higher, dual clip, fused-linear loss
    "grpo-fused": dict(advantage_estimator="grpo", loss_agg="seq-mean-token-mean", kl_placement="loss",
                       kl_coef=0.1, clip_eps_high=0.28, dual_clip=3.0, use_fused_linear=True),
    # RLOO, Dr. GRPO's constant normaliser, k2 in the loss
    "rloo-norm": dict(advantage_estimator="rloo", loss_agg="seq-mean-token-sum-norm", kl_placement="loss",
                      kl_estimator="k2", kl_coef=0.1),
    # GAE with a separate critic model, seq-mean-token-sum, unclipped value loss
    "gae-critic": dict(advantage_estimator="gae", loss_agg="seq-mean-token-sum", value_clip=None, value_lr=1e-2),
}


def _run_update(cfg, policy, critic, rollout, dp_kind):
    """One step's update on copies of the models: (metrics, weights, last minibatch's gradients)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from rlhf_fast.training import distributed, ppo_update

    model, value = copy.deepcopy(policy), copy.deepcopy(critic)
    dp = distributed.wrap(model, value, dp_kind) if dp_kind else distributed.SingleProcess(model, value)
    optimizer = _sgd(model, value)
    order = torch.Generator().manual_seed(11)
    metrics = ppo_update(cfg, dp, optimizer, rollout, cfg.kl_coef, generator=order)
    if dp_kind is None:
        holder = distributed.PolicyAndCritic(model, value)
        return metrics, holder.state_dict(), {k: p.grad for k, p in holder.named_parameters()}
    state = get_model_state_dict(dp.models, options=StateDictOptions(full_state_dict=True))
    grads = {k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for k, p in dp.models.named_parameters()}  # FSDP2: DTensor shards, gathered
    return metrics, state, grads


def _update_worker(rank: int, world: int, init_file: str, cases, kind: str) -> None:
    _setup(rank, world, init_file)
    from test_ppo import EOS, PAD, base_config, build

    from rlhf_fast.training import ValueHead, collect_rollout, distributed, validate
    from rlhf_fast.training.seeding import seed_everything

    with closing_process_group():
        for name in cases:
            policy, ref, reward_model, prompts = build("gpt2")
            cfg = base_config(Path(init_file).parent, epochs=2, minibatch_size=4 if world == 2 else 3,
                              batch=4 if world == 2 else 3, max_grad_norm=0.5, **UPDATE_CASES[name])
            with pytest.raises(ValueError, match="must split evenly"):
                validate(dataclasses.replace(cfg, minibatch_size=1))
            for model in (policy, ref, reward_model):
                model.eval()
            critic = None
            if cfg.advantage_estimator == "gae":
                critic = copy.deepcopy(reward_model) if name == "gae-critic" else ValueHead(32)
            # the same global rollout on every rank (one process's rollout, seeded)
            step_prompts = [p for p in prompts[: cfg.batch] for _ in range(cfg.samples_per_prompt)]
            seed_everything(0)
            rollout = collect_rollout(cfg, distributed.SingleProcess(policy, critic), ref, reward_model,
                                      step_prompts, cfg.kl_coef, EOS, PAD["gpt2"])
            check = rollout.old_logprobs.sum().view(1).repeat(2) * torch.tensor([1.0, -1.0])
            dist.all_reduce(check, op=dist.ReduceOp.MAX)
            assert float(check[0]) == -float(check[1]), "ranks built different rollouts"

            one_metrics, one_state, one_grads = _run_update(cfg, policy, critic, rollout, None)
            dp_metrics, dp_state, dp_grads = _run_update(cfg, policy, critic, rollout, kind)
            what = f"rank {rank}/{world} {kind} {name}"
            assert set(dp_metrics) == set(one_metrics), what
            assert set(dp_state) == set(one_state), what
            for key, value in one_metrics.items():
                assert dp_metrics[key] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{what} metric {key}"
            assert one_metrics["epochs_run"] == 2 and one_metrics["grad_norm"] > 0
            for kind_of, one, other in (("weight", one_state, dp_state), ("grad", one_grads, dp_grads)):
                for key, value in one.items():
                    torch.testing.assert_close(other[key], value, rtol=RTOL, atol=ATOL,
                                               msg=lambda m, k=key, w=what, t=kind_of: f"{w} {t} {k}: {m}")


@pytest.mark.parametrize("world,kind,cases", [
    (2, "ddp", ["gae-valuehead", "grpo-fused", "rloo-norm", "gae-critic"]),
    (3, "ddp", ["gae-critic"]),
    (2, "fsdp2", ["gae-valuehead", "grpo-fused"]),
])
def test_data_parallel_update_equals_one_process(tmp_path, world, kind, cases):
    mp.spawn(_update_worker, args=(world, str(tmp_path / "init"), cases, kind), nprocs=world, join=True)


# ----------------------------------------------------------------------------- checkpoints


def _fixed_replies(policy, prompt_lists, *, max_new_tokens, temperature, eos_token_id, pad_token_id,
                   synced_gpus=False, batch_size=None, with_logprobs=False):
    """Stand-in for ``sample_replies``: each reply is a function of its prompt (and of its index among
    the copies of that prompt), laid out as ``sample_replies`` lays out ``generate``'s output."""
    from test_ppo import VOCAB

    from rlhf_fast.training import Samples, left_pad
    from rlhf_fast.training.reward import position_ids_from_mask

    replies, seen = [], {}
    for prompt in prompt_lists:
        copy_index = seen[tuple(prompt)] = seen.get(tuple(prompt), -1) + 1
        length = 1 + (sum(prompt) + copy_index) % max_new_tokens
        tokens = [2 + (prompt[0] * 7 + 3 * j + 5 * copy_index) % (VOCAB - 2) for j in range(length)]
        if length < max_new_tokens:
            tokens[-1] = eos_token_id
        replies.append(tokens)
    prompt_ids, prompt_mask = left_pad(prompt_lists, pad_token_id)
    width = max(len(r) for r in replies)
    response = torch.full((len(replies), width), pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(replies):
        response[row, : len(tokens)] = torch.tensor(tokens)
    lengths = torch.tensor([len(r) for r in replies])
    response_mask = torch.arange(width)[None, :] < lengths[:, None]
    has_eos = torch.tensor([r[-1] == eos_token_id for r in replies])
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Samples(torch.cat([prompt_ids, response], dim=1), attention_mask, position_ids_from_mask(attention_mask),
                   prompt_ids.shape[1], response, response_mask, lengths, has_eos)


def _train_worker(rank: int, world: int, init_file: str, runs) -> None:
    """Each run: (out_dir, config overrides, result file or None); rank 0 saves records and weights."""
    _setup(rank, world, init_file)
    from test_ppo import EOS, PAD, build

    import rlhf_fast as rf
    from rlhf_fast.training import distributed, rollout

    rollout.sample_replies = _fixed_replies
    with closing_process_group():
        for out_dir, overrides, result in runs:
            policy, ref, reward_model, prompts = build("gpt2")
            cfg = rf.PPOConfig(
                seed=3, batch=2, samples_per_prompt=2, minibatch_size=2, epochs=2, lr=3e-3, max_new_tokens=5,
                loss_backend="eager", adaptive_kl=True, kl_coef=0.2, kl_target=0.05, kl_horizon=20.0,
                out_dir=out_dir, progress=False, **overrides,
            )
            executed = []  # steps this run computed (not restored from a checkpoint)
            records = rf.train_ppo(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"],
                                log_fn=lambda record, out=executed: out.append(record.step))
            weights = distributed.full_state_dict(policy)  # every rank takes part; rank 0 gets it
            if rank == 0 and result is not None:
                torch.save({"records": [r.to_dict() for r in records], "weights": weights, "executed": executed},
                           result)


def _spawn(world, tmp_path, phase, runs):
    mp.spawn(_train_worker, args=(world, str(tmp_path / f"init-{phase}"), runs), nprocs=world, join=True)


def alert_key(alert):
    """An alert without its message (whose numbers are rounded for people)."""
    return alert["step"], alert["signal"], alert["severity"]


def test_checkpoint_resumes_under_another_world_size(tmp_path):
    """2 processes → checkpoint → 1 process, and 1 → 2 (the second one on FSDP2), continue as the
    uninterrupted runs: same step, records (controller included) and weights."""
    d = {name: str(tmp_path / name) for name in ("full2", "ck2", "full1", "ck1")}
    r = {name: str(tmp_path / f"{name}.pt") for name in ("full2", "res21", "full1", "res12")}
    _spawn(2, tmp_path, 1, [(d["full2"], dict(steps=3), r["full2"]),
                            (d["ck2"], dict(steps=2, checkpoint_every=2), None)])
    _spawn(1, tmp_path, 2, [(d["ck2"], dict(steps=3, checkpoint_every=2, resume=True), r["res21"]),
                            (d["full1"], dict(steps=3), r["full1"]),
                            (d["ck1"], dict(steps=2, checkpoint_every=2), None)])
    _spawn(2, tmp_path, 3, [(d["ck1"], dict(steps=3, checkpoint_every=2, resume=True, data_parallel="fsdp2"),
                             r["res12"])])

    results = {name: torch.load(path, weights_only=False) for name, path in r.items()}
    truth = results["full2"]
    assert [rec["step"] for rec in truth["records"]] == [1, 2, 3]
    assert truth["executed"] == results["full1"]["executed"] == [1, 2, 3]
    assert results["res21"]["executed"] == results["res12"]["executed"] == [3]  # resumed after step 2
    assert truth["records"][0]["kl_coef_next"] != 0.2  # the controller moved
    for name in ("res21", "full1", "res12"):
        got = results[name]
        assert [rec["step"] for rec in got["records"]] == [1, 2, 3], name
        for expected, record in zip(truth["records"], got["records"]):
            assert set(record) == set(expected), name
            for key, value in expected.items():
                # value_clipfrac counts exact ties (V = V_old in a step's first minibatch) whose side is
                # decided by rounding; the update test compares it on one shared rollout.
                if key == "monitor":  # the monitor's alerts: which signal fired at which step, how loudly
                    assert [alert_key(a) for a in record[key]] == [alert_key(a) for a in value], (name, key)
                elif key not in ("step_time_s", "value_clipfrac"):
                    assert record[key] == pytest.approx(value, rel=WEIGHT_RTOL, abs=WEIGHT_ATOL), (name, key)
        for key, value in truth["weights"].items():
            torch.testing.assert_close(got["weights"][key], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
    for run in ("ck2", "ck1"):  # the resumed runs' files: metrics of every step, the last checkpoint current
        with open(os.path.join(d[run], "metrics.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2, 3], run
        with open(os.path.join(d[run], "checkpoint", "latest")) as f:
            assert f.read() == "step-00000003", run


def test_torchrun_cli_two_processes(tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m rlhf_fast ppo``: gloo on CPU, rank 0 writes."""
    from test_ppo import EOS, build

    from rlhf_fast.training.reward import save_reward_model

    policy, _, reward_model, prompts = build("gpt2")
    policy.save_pretrained(tmp_path / "policy")
    save_reward_model(reward_model, str(tmp_path / "rm"))
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    out_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "rlhf_fast", "ppo", "--policy", str(tmp_path / "policy"), "--reward-model", str(tmp_path / "rm"),
        "--prompts", str(tmp_path / "prompts.jsonl"), "--eos-token-id", str(EOS), "--steps", "2", "--batch", "2",
        "--samples-per-prompt", "2", "--minibatch-size", "2", "--max-new-tokens", "4", "--loss-backend", "eager",
        "--no-progress", "--checkpoint-every", "1", "--out-dir", str(out_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["step"] == 2  # rank 0 alone prints
    with open(out_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert (out_dir / "checkpoint" / "latest").read_text() == "step-00000002"
    assert (out_dir / "policy" / "config.json").exists()


def test_data_parallel_needs_a_process_group_and_matching_checkpoints(tmp_path):
    from test_ppo import EOS, PAD, base_config, build

    from rlhf_fast.training import train, validate

    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        validate(base_config(tmp_path, data_parallel="ddp"))
    validate(base_config(tmp_path, data_parallel="auto"))  # no process group: one process
    # a torch.distributed checkpoint cannot be resumed by a single process (and vice versa)
    cfg = base_config(tmp_path, resume=True)
    os.makedirs(os.path.join(cfg.out_dir, "checkpoint"))
    with open(os.path.join(cfg.out_dir, "checkpoint", "latest"), "w") as f:
        f.write("step-00000002")
    policy, ref, reward_model, prompts = build("gpt2")
    with pytest.raises(ValueError, match="holds a torch.distributed checkpoint"):
        train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
