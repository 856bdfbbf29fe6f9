"""PPO loop on tiny random GPT-2 / Llama models built from configs (no downloads).

Every test passes an explicit loss backend ("eager" or "cpp"): under pytest
TRITON_INTERPRET may be set, and "auto" must never pick the slow interpreter here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf_fast import backends  # noqa: E402
from rlhf_fast.training import (  # noqa: E402
    METRICS,
    PPOConfig,
    RewardModel,
    ValueHead,
    ppo_update,
    save_reward_model,
    train,
    validate,
)
from rlhf_fast.training import collect_rollout as _collect_rollout  # noqa: E402
from rlhf_fast.training.checkpoint import load as load_checkpoint  # noqa: E402
from rlhf_fast.training.cli import field_help  # noqa: E402
from rlhf_fast.training.distributed import SingleProcess  # noqa: E402
from rlhf_fast.training.seeding import seed_everything  # noqa: E402

VOCAB = 32


def collect_rollout(cfg, policy, ref, reward_model, critic, step_prompts, beta, eos, pad):
    """One process's rollout (the trainer's call, with the one-process data-parallel stand-in)."""
    return _collect_rollout(cfg, SingleProcess(policy, critic), ref, reward_model, step_prompts, beta, eos, pad)
EOS = 1
PAD = {"gpt2": 1, "llama": 0}  # GPT-2 style pad == EOS, Llama style a separate pad id


def tiny_lm(arch: str, seed: int):
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_layer=2, n_embd=32, n_head=2,
            bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD[arch],
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS,
        pad_token_id=PAD[arch],
    )
    return transformers.LlamaForCausalLM(config)


def build(arch: str = "gpt2"):
    """(policy, reference, reward model, prompts), identical for identical arch."""
    policy = tiny_lm(arch, seed=0)
    ref = copy.deepcopy(policy)
    reward_model = RewardModel(tiny_lm(arch, seed=1).base_model)
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(2, 6, (10,), generator=g).tolist()
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]
    return policy, ref, reward_model, prompts


def base_config(tmp_path, **overrides) -> PPOConfig:
    values = dict(
        seed=0, steps=2, batch=3, samples_per_prompt=2, minibatch_size=3, epochs=2, lr=1e-3,
        max_new_tokens=5, temperature=0.9, loss_backend="eager", out_dir=str(tmp_path / "run"), progress=False,
    )
    values.update(overrides)
    return PPOConfig(**values)


def all_finite(metrics):
    return {k: v for k, v in metrics.items() if not math.isfinite(v)}


def reply_stats(prompts, responses):
    """An extra_metrics callback, as the case study's gold judge would be."""
    assert len(prompts) == len(responses)
    return {"gold_mean_len": sum(len(r) for r in responses) / len(responses)}


@pytest.mark.parametrize("placement", ["reward", "loss"])
@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_two_steps_every_diagnostic_finite(tmp_path, arch, estimator, placement):
    policy, ref, reward_model, prompts = build(arch)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = base_config(
        tmp_path, advantage_estimator=estimator, kl_placement=placement, kl_coef=0.1,
        adaptive_kl=estimator != "rloo", kl_target=0.5, kl_horizon=100.0, entropy_coef=0.01,
        clip_eps_high=0.28, dual_clip=3.0, missing_eos_penalty=0.5, length_penalty=0.01,
        loss_agg="seq-mean-token-mean" if estimator == "grpo" else "token-mean",
    )
    logged = []
    records = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD[arch],
                    extra_metrics=reply_stats, log_fn=logged.append)
    assert [r.step for r in records] == [1, 2] and logged == records
    for record in records:
        missing = set(METRICS) - set(record.metrics)
        assert not missing, missing
        assert not all_finite(record.metrics), all_finite(record.metrics)
        assert "gold_mean_len" in record.metrics
        m = record.metrics
        assert 1 <= m["response_length_mean"] <= m["response_length_max"] <= cfg.max_new_tokens
        assert 0 <= m["frac_truncated"] <= 1 and m["epochs_run"] == cfg.epochs
        assert m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
    if cfg.adaptive_kl:  # the controller moved β
        assert records[0].metrics["kl_coef_next"] != records[0].metrics["kl_coef"]
        assert records[1].metrics["kl_coef"] == records[0].metrics["kl_coef_next"]
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [1, 2]
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_kl_coef_min_is_the_floor_of_the_adaptive_beta(tmp_path):
    """In the loop, β of every step follows β ← max(β·(1 + e·n/H), kl_coef_min) from the step's own KL, by hand;
    with the KL far under its target β stays at its start (the controller alone lowers it), far over it β rises."""
    def records(name, **overrides):
        policy, ref, reward_model, prompts = build("gpt2")
        cfg = base_config(tmp_path / name, steps=3, adaptive_kl=True, kl_coef=0.2, kl_horizon=10.0, **overrides)
        out = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
        beta = cfg.kl_coef
        for record in out:
            m = record.metrics
            error = min(max(m["kl_ref_k1_sum"] / cfg.kl_target - 1, -0.2), 0.2)
            assert m["kl_coef"] == beta
            beta = max(beta * (1 + error * 6 / cfg.kl_horizon), cfg.kl_coef_min or 0.0)  # 6 replies per step
            assert m["kl_coef_next"] == pytest.approx(beta, rel=1e-12)
            beta = m["kl_coef_next"]
        return [r.metrics["kl_coef_next"] for r in out]

    assert records("free", kl_target=100.0) == pytest.approx([0.2 * 0.88 ** k for k in (1, 2, 3)])
    assert records("floored", kl_target=100.0, kl_coef_min=0.2) == [0.2, 0.2, 0.2]
    rising = records("ceiling", kl_target=1e-9, kl_coef_min=0.2)
    # the floor never stops β from rising (a step's sampled k1 sum can still fall under the tiny target:
    # at step 1 the policy is the reference, and a later batch's k1 sum may be negative)
    assert min(rising) == 0.2 and max(rising) > 0.2


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo", "sapo"])
def test_variants_and_rollout_correction_train(tmp_path, policy_loss):
    """Part of the loss layer's options through PPOConfig: a variant, the sampler's own log-probs as the
    rollout log-probs of a truncated importance correction, the unbiased KL and the clamps."""
    from rlhf_fast.training.records import ROLLOUT_CORRECTION_METRICS

    policy, ref, reward_model, prompts = build("gpt2")
    cfg = base_config(tmp_path, advantage_estimator="grpo", kl_placement="loss", kl_coef=0.1,
                      policy_loss=policy_loss, rollout_is="truncate", rollout_is_level="sequence",
                      kl_ratio_weighted=True, log_ratio_clamp=20.0, kl_clamp=10.0,
                      clip_eps=1.0 if policy_loss == "cispo" else 0.2, clip_eps_high=4.0 if policy_loss == "cispo"
                      else None)
    records = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
    for record in records:
        assert set(METRICS) | set(ROLLOUT_CORRECTION_METRICS) <= set(record.metrics)
        assert not all_finite(record.metrics), all_finite(record.metrics)
        # generate's KV-cached forwards and the full forward agree closely: weights near 1
        assert 0.9 < record.metrics["rollout_weight_mean"] < 1.1


def test_separate_critic_and_prompt_tensor_input(tmp_path):
    policy, ref, reward_model, prompts = build("gpt2")
    critic = copy.deepcopy(reward_model)  # critic initialised from the reward model
    critic_before = copy.deepcopy(critic.state_dict())
    from rlhf_fast.training import left_pad

    ids, mask = left_pad(prompts, PAD["gpt2"])
    cfg = base_config(tmp_path, steps=1, value_lr=1e-2, value_clip=None, whiten=False)
    records = train(cfg, policy, ref, reward_model, (ids, mask), eos_token_id=EOS, pad_token_id=PAD["gpt2"],
                    value_model=critic)
    assert not all_finite(records[0].metrics)
    assert records[0].metrics["value_loss"] > 0
    assert any(not torch.equal(critic_before[k], v) for k, v in critic.state_dict().items())


def test_early_stop_on_approx_kl(tmp_path):
    policy, ref, reward_model, prompts = build("gpt2")
    cfg = base_config(tmp_path, steps=1, epochs=4, minibatch_size=2, lr=5e-2, early_stop_approx_kl=1e-6)
    (record,) = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
    assert record.metrics["early_stopped"] == 1.0
    assert record.metrics["epochs_run"] < cfg.epochs


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_lr_schedule(tmp_path, schedule):
    """linear: the policy's lr is lr × (1 − step / steps) in step ``step`` (0-based); constant: lr throughout."""
    policy, ref, reward_model, prompts = build("gpt2")
    cfg = base_config(tmp_path, steps=4, lr=1e-3, value_lr=4e-3, lr_schedule=schedule)
    seen = []

    def log_fn(record):
        seen.append(record.metrics["lr"])

    train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"], log_fn=log_fn)
    expected = [1e-3 * (1 - s / 4) if schedule == "linear" else 1e-3 for s in range(4)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_lr_schedule_is_checked(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        base_config(tmp_path, lr_schedule="cosine")


class _Crash(RuntimeError):
    pass


def _run_for_resume(out_dir, resume=False, crash_at=None):
    policy, ref, reward_model, prompts = build("gpt2")
    cfg = PPOConfig(
        seed=3, steps=4, batch=2, samples_per_prompt=2, minibatch_size=2, epochs=2, lr=3e-3, max_new_tokens=5,
        loss_backend="eager", adaptive_kl=True, kl_coef=0.2, kl_target=0.05, kl_horizon=20.0,
        checkpoint_every=2, out_dir=str(out_dir), resume=resume, progress=False,
    )

    def log_fn(record):
        if record.step == crash_at:
            raise _Crash(f"simulated crash after step {record.step}")

    records = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"],
                    log_fn=log_fn)
    return policy, records


def test_resume_falls_back_to_the_previous_checkpoint_and_removes_stray_files(tmp_path):
    """A checkpoint.pt truncated by a kill mid-write: resume warns, continues from checkpoint.prev.pt and
    still reproduces the uninterrupted run; temporaries of interrupted writes are deleted."""
    full_policy, full_records = _run_for_resume(tmp_path / "full")
    run = tmp_path / "damaged"
    _run_for_resume(run)  # checkpoints at steps 2 and 4
    assert load_checkpoint(str(run / "checkpoint.prev.pt"))["step"] == 2
    with open(run / "checkpoint.pt", "r+b") as f:  # what a kill during a non-atomic write would leave
        f.truncate(1000)
    (run / ".tmp-interrupted.pt").write_bytes(b"partial")
    (run / ".tmp-metrics.txt").write_text("partial")
    with pytest.warns(RuntimeWarning, match="checkpoint.pt is unreadable"):
        resumed_policy, resumed_records = _run_for_resume(run, resume=True)
    assert _without_time(resumed_records) == _without_time(full_records)
    for name, value in full_policy.state_dict().items():
        assert torch.equal(value, resumed_policy.state_dict()[name]), name
    assert not list(run.glob(".tmp-*"))
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 4


def test_resume_with_no_readable_checkpoint_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no readable checkpoint"):
        _run_for_resume(run, resume=True)


def _without_time(records):
    return [{k: v for k, v in r.to_dict().items() if k != "step_time_s"} for r in records]


def test_resume_after_crash_reproduces_the_uninterrupted_run(tmp_path):
    full_policy, full_records = _run_for_resume(tmp_path / "full")
    with pytest.raises(_Crash):
        _run_for_resume(tmp_path / "crashed", crash_at=3)  # dies after step 3; last checkpoint at step 2
    with open(tmp_path / "crashed" / "metrics.jsonl") as f:
        assert len(f.readlines()) == 3
    resumed_policy, resumed_records = _run_for_resume(tmp_path / "crashed", resume=True)

    assert [r.step for r in resumed_records] == [1, 2, 3, 4]
    assert _without_time(resumed_records) == _without_time(full_records)
    for name, value in full_policy.state_dict().items():
        assert torch.equal(value, resumed_policy.state_dict()[name]), name
    full = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    resumed = load_checkpoint(str(tmp_path / "crashed" / "checkpoint.pt"))
    assert full["step"] == resumed["step"] == 4
    assert full["kl_controller"] == resumed["kl_controller"]
    assert full["kl_controller"]["value"] != 0.2  # the controller did move
    for name, value in full["critic"].items():
        assert torch.equal(value, resumed["critic"][name]), name
    assert torch.equal(full["rng"]["torch"], resumed["rng"]["torch"])
    with open(tmp_path / "crashed" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]  # the crashed run's step-3 line was replaced


def _fused_candidates():
    candidates = []
    if backends.load_ops("cpp")[0] is not None:
        candidates.append(("cpp", dict(loss_backend="cpp")))
    try:
        import rlhf_fast.loss.fused_linear  # noqa: F401

        candidates.append(("fused-linear", dict(use_fused_linear=True, loss_backend="eager")))
        if backends.load_ops("cpp")[0] is not None:
            candidates.append(("fused-linear+cpp", dict(use_fused_linear=True, loss_backend="cpp")))
    except ImportError:
        pass
    return candidates


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_fused_and_eager_backends_give_the_same_first_update(tmp_path, estimator):
    candidates = _fused_candidates()
    if not candidates:
        pytest.skip(
            "no fused CPU path to compare: the C++ extension is not built "
            f"({backends.load_ops('cpp')[1]}) and rlhf_fast.loss.fused_linear is missing; 'auto' would be eager here"
        )
    policy, ref, reward_model, prompts = build("gpt2")
    cfg = base_config(tmp_path, advantage_estimator=estimator, epochs=1, minibatch_size=6, kl_placement="loss",
                      kl_coef=0.1, entropy_coef=0.01, max_grad_norm=None)
    for model in (policy, ref, reward_model):
        model.eval()  # as train() does: no dropout
    critic = ValueHead(32) if estimator == "gae" else None
    step_prompts = [p for p in prompts[: cfg.batch] for _ in range(cfg.samples_per_prompt)]
    seed_everything(0)
    rollout = collect_rollout(cfg, policy, ref, reward_model, critic, step_prompts, cfg.kl_coef, EOS, PAD["gpt2"])

    def first_update(run_cfg):
        """One SGD(lr=1) step on the whole batch: the weight change is exactly −grad."""
        seed_everything(0)
        run_rollout = collect_rollout(run_cfg, policy, ref, reward_model, critic, step_prompts, cfg.kl_coef,
                                      EOS, PAD["gpt2"])
        model, value = copy.deepcopy(policy), copy.deepcopy(critic)
        params = list(model.parameters()) + (list(value.parameters()) if value is not None else [])
        metrics = ppo_update(run_cfg, SingleProcess(model, value), torch.optim.SGD(params, lr=1.0), run_rollout,
                             cfg.kl_coef)
        delta = {k: v - policy.state_dict()[k] for k, v in model.state_dict().items()}
        return run_rollout, metrics, delta

    eager_rollout, eager_metrics, eager_delta = first_update(cfg)
    torch.testing.assert_close(eager_rollout.old_logprobs, rollout.old_logprobs)  # same batch
    assert abs(eager_metrics["ratio_max"] - 1) < 1e-5 and abs(eager_metrics["ratio_min"] - 1) < 1e-5
    assert max(float(d.abs().max()) for d in eager_delta.values()) > 0
    for label, overrides in candidates:
        fused_rollout, fused_metrics, fused_delta = first_update(dataclasses.replace(cfg, **overrides))
        torch.testing.assert_close(fused_rollout.samples.response_ids, eager_rollout.samples.response_ids,
                                   rtol=0, atol=0)
        torch.testing.assert_close(fused_rollout.old_logprobs, eager_rollout.old_logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_rollout.ref_logprobs, eager_rollout.ref_logprobs, rtol=1e-5, atol=1e-5)
        for key in ("pg_loss", "loss_kl", "clipfrac", "ratio_mean", "approx_kl", "value_loss"):
            assert fused_metrics[key] == pytest.approx(eager_metrics[key], rel=1e-4, abs=1e-6), (label, key)
        for name, d in eager_delta.items():
            torch.testing.assert_close(fused_delta[name], d, rtol=1e-4, atol=1e-6, msg=f"{label}: {name}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(advantage_estimator="ppo2"), "advantage_estimator must be one of"),
        (dict(adaptive_kl=True, kl_target=-1.0), "kl_target must be > 0"),
        (dict(kl_target=-1.0), "kl_target must be > 0"),
        (dict(batch=3, samples_per_prompt=1, minibatch_size=2), "not divisible by minibatch_size"),
        (dict(kl_placement="both"), "kl_placement must be one of"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(advantage_estimator="grpo", samples_per_prompt=1, minibatch_size=1), "samples_per_prompt must be >= 2"),
        (dict(advantage_estimator="rloo", samples_per_prompt=1, minibatch_size=1), "samples_per_prompt must be >= 2"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(dual_clip=1.0), "dual_clip must be a finite number > 1"),
        (dict(adaptive_kl=True, kl_coef=0.0), "adaptive_kl needs kl_coef > 0"),
        (dict(kl_coef_min=0.01), "kl_coef_min bounds the adaptive β: set adaptive_kl=True"),
        (dict(adaptive_kl=True, kl_coef=0.1, kl_coef_min=0.2), r"kl_coef_min must be in \[0, kl_coef\]"),
        (dict(adaptive_kl=True, kl_coef_min=-0.1), r"kl_coef_min must be in \[0, kl_coef\]"),
        (dict(loss_agg="sum"), "loss_agg must be one of"),
        (dict(loss_backend="cuda"), "loss_backend must be one of"),
        (dict(gamma=1.5), "gamma must be in"),
        (dict(minibatch_size=0), "minibatch_size must be an integer >= 1"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):  # PPOConfig validates at construction
        base_config(tmp_path, **overrides)
    assert not os.path.exists(tmp_path / "run")


def test_train_checks_its_inputs_before_any_work(tmp_path):
    cfg = base_config(tmp_path)
    with pytest.raises(ValueError, match="only 1 prompts"):
        train(cfg, None, None, None, [[2, 3]], eos_token_id=EOS, pad_token_id=EOS)  # models never touched
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        validate(dataclasses.replace(cfg, data_parallel="ddp"))
    assert not os.path.exists(cfg.out_dir)


def test_every_problem_reported_at_once(tmp_path):
    with pytest.raises(ValueError) as info:
        base_config(tmp_path, advantage_estimator="x", kl_target=-2.0, temperature=-1.0)
    text = str(info.value)
    assert "advantage_estimator" in text and "kl_target" in text and "temperature" in text


def test_mismatched_tokenizers_and_vocabularies_fail_early(tmp_path):
    policy, ref, reward_model, prompts = build("gpt2")
    cfg = base_config(tmp_path)
    tok_a = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})
    tok_b = SimpleNamespace(get_vocab=lambda: {"a": 0, "c": 1})
    with pytest.raises(ValueError, match="tokenizers differ"):
        train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=EOS,
              policy_tokenizer=tok_a, reward_tokenizer=tok_b)
    other_ref = tiny_lm("gpt2", 0)
    other_ref.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match="different vocabularies"):
        train(cfg, policy, other_ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=EOS)
    with pytest.raises(ValueError, match="eos_token_id"):
        train(cfg, policy, ref, reward_model, prompts, eos_token_id=VOCAB, pad_token_id=EOS)
    with pytest.raises(ValueError, match="not calibrated"):
        train(dataclasses.replace(cfg, reward_normalize=True), policy, ref, reward_model, prompts,
              eos_token_id=EOS, pad_token_id=EOS)
    with pytest.raises(ValueError, match="only 2 prompts"):
        train(cfg, policy, ref, reward_model, prompts[:2], eos_token_id=EOS, pad_token_id=EOS)
    assert not os.path.exists(cfg.out_dir)


def test_every_config_field_has_a_docstring():
    docs = field_help(PPOConfig)
    missing = [f.name for f in dataclasses.fields(PPOConfig) if not docs.get(f.name)]
    assert not missing, missing


def test_cli_runs_ppo_from_saved_models(tmp_path, capsys):
    from rlhf_fast.__main__ import main

    policy, _, reward_model, prompts = build("gpt2")
    policy.save_pretrained(tmp_path / "policy")
    save_reward_model(reward_model, str(tmp_path / "rm"))
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps(p if i % 2 else {"input_ids": p}) + "\n")
    out_dir = tmp_path / "cli_run"
    code = main([
        "ppo", "--policy", str(tmp_path / "policy"), "--reward-model", str(tmp_path / "rm"),
        "--prompts", str(tmp_path / "prompts.jsonl"), "--eos-token-id", str(EOS),
        "--steps", "1", "--batch", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--max-new-tokens", "4", "--loss-backend", "eager", "--advantage-estimator", "rloo",
        "--clip-eps-high", "none", "--no-progress", "--adaptive-kl", "--out-dir", str(out_dir),
    ])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 1 and math.isfinite(last["kl_ref_k1_sum"])
    assert (out_dir / "policy" / "config.json").exists()
    with pytest.raises(SystemExit) as info:
        main(["ppo", "--help"])
    assert info.value.code == 0
    assert "Target of the adaptive controller" in capsys.readouterr().out


def test_training_exports_are_lazy():
    code = (
        "import sys, rlhf_fast as rf\n"
        "assert 'transformers' not in sys.modules and 'rlhf_fast.training' not in sys.modules\n"
        "assert rf.PPOConfig is __import__('rlhf_fast.training', fromlist=['x']).PPOConfig\n"
        "assert rf.PPOConfig is __import__('rlhf_fast.ppo', fromlist=['x']).PPOConfig  # the old path\n"
        "assert callable(rf.train_ppo) and callable(rf.train_reward_model)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sampling_distribution_is_the_one_the_loss_sees(tmp_path):
    """generate samples from softmax(logits / τ) with no top-k/top-p: its scores at the sampled
    tokens equal the old log-probs that go into the loss; the rewards carry −β·k1 and the score."""
    from rlhf_fast.training import sample_replies

    policy, ref, reward_model, prompts = build("llama")
    for model in (policy, ref, reward_model):
        model.eval()
    with torch.no_grad():  # make the reference differ so that k1 ≠ 0
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = base_config(tmp_path, temperature=0.7, kl_coef=0.3, length_penalty=0.1, missing_eos_penalty=1.0,
                      advantage_estimator="rloo")
    captured = {}
    original_generate = policy.generate

    def spy(**kwargs):
        captured.update(kwargs)
        return original_generate(**kwargs)

    policy.generate = spy
    step_prompts = [p for p in prompts[:3] for _ in range(2)]
    seed_everything(0)
    rollout = collect_rollout(cfg, policy, ref, reward_model, None, step_prompts, cfg.kl_coef, EOS, PAD["llama"])
    generation = captured["generation_config"]
    assert generation.do_sample and generation.temperature == 0.7 and generation.top_k == 0
    assert generation.top_p == 1.0 and generation.max_new_tokens == 5

    seed_everything(0)  # same draw again, now with the sampler's own scores
    samples = sample_replies(policy, step_prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             eos_token_id=EOS, pad_token_id=PAD["llama"])
    assert torch.equal(samples.response_ids, rollout.samples.response_ids)
    seed_everything(0)
    out = original_generate(input_ids=captured["input_ids"], attention_mask=captured["attention_mask"],
                            generation_config=generation.__class__(**{**generation.to_dict(),
                                                                      "output_scores": True,
                                                                      "return_dict_in_generate": True}))
    scores = torch.stack(out.scores, dim=1).log_softmax(-1)  # [B, R, V], processed (÷τ) logits
    sampled = scores.gather(-1, rollout.samples.response_ids[:, : scores.shape[1], None]).squeeze(-1)
    mask = rollout.samples.response_mask[:, : scores.shape[1]]
    torch.testing.assert_close(sampled[mask], rollout.old_logprobs[:, : scores.shape[1]][mask], rtol=1e-4, atol=1e-4)

    k1 = (rollout.old_logprobs - rollout.ref_logprobs) * rollout.samples.response_mask
    assert float(k1.abs().sum()) > 0
    expected_scores = (rollout.raw_scores - 1.0 * (~rollout.samples.has_eos).float()
                       - 0.1 * rollout.samples.lengths.float())
    torch.testing.assert_close(rollout.scores, expected_scores)
    torch.testing.assert_close(rollout.rewards.sum(dim=1), rollout.scores - 0.3 * k1.sum(dim=1))
    assert torch.all(rollout.rewards[~rollout.samples.response_mask] == 0)


def test_normalised_reward_uses_the_calibration(tmp_path):
    from rlhf_fast.training.reward import calibrate

    policy, ref, reward_model, prompts = build("gpt2")
    ids = torch.randint(2, VOCAB, (16, 6), generator=torch.Generator().manual_seed(5))
    mean, std = calibrate(reward_model, ids, torch.ones_like(ids))
    cfg = base_config(tmp_path, steps=1, reward_normalize=True, advantage_estimator="rloo")
    (record,) = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
    m = record.metrics
    assert m["score_norm_mean"] == pytest.approx((m["score_raw_mean"] - mean) / std, rel=1e-4, abs=1e-5)
    assert m["score_mean"] == pytest.approx(m["score_norm_mean"], rel=1e-5, abs=1e-6)


def test_soft_capped_model_uses_the_models_own_logits(tmp_path):
    """A Gemma-2-style model soft-caps its logits: the loop's old log-probs are those of the model's own
    logits (logits path and fused-linear path), and a step trains."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                          eos_token_id=EOS, pad_token_id=PAD["llama"], bos_token_id=PAD["llama"])
    policy = Gemma2ForCausalLM(config).eval()
    reward_model = RewardModel(tiny_lm("gpt2", seed=1).base_model).eval()
    _, _, _, prompts = build("gpt2")
    step_prompts = [p for p in prompts[:3] for _ in range(2)]
    for fused in (False, True):
        cfg = base_config(tmp_path / str(fused), steps=1, epochs=1, minibatch_size=6, advantage_estimator="rloo",
                          use_fused_linear=fused)
        seed_everything(0)
        rollout = collect_rollout(cfg, policy, policy, reward_model, None, step_prompts, 0.0, EOS, PAD["llama"])
        samples = rollout.samples
        with torch.no_grad():
            logits = policy(input_ids=samples.input_ids, attention_mask=samples.attention_mask,
                            position_ids=samples.position_ids).logits[:, samples.prompt_len - 1 : -1]
        assert logits.abs().max() <= 0.5 + 1e-6  # the cap is active
        want = torch.log_softmax(logits.float() / cfg.temperature, -1).gather(
            -1, samples.response_ids[..., None]).squeeze(-1) * samples.response_mask
        torch.testing.assert_close(rollout.old_logprobs, want, rtol=1e-5, atol=1e-5)
        (record,) = train(cfg, copy.deepcopy(policy), policy, reward_model, prompts, eos_token_id=EOS,
                          pad_token_id=PAD["llama"])
        assert abs(record.metrics["ratio_max"] - 1) < 1e-5
