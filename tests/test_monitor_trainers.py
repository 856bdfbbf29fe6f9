"""The reward-hacking monitor inside the trainers, each with the real package.

* rlhf_fast's PPO loop: on by default, its alerts in metrics.jsonl and the progress display (the same
  alerts as the offline command on that file), ``stop_on_alarm`` with its checkpoint and a resume.
* TRL (GRPO, tiny Llama on a character vocabulary, CPU): a second world. A reward that pays for length
  alone raises an alarm; one that pays for the first character, which length cannot game, raises none.
  Both with the rlhf_fast integration (within-batch correlation, per-token KL) and the plain trainer.
* verl: metric dicts made by verl's own code (``compute_data_metrics``, ``apply_kl_penalty`` with its
  KL controllers) on synthetic batches, logged through verl's ``Tracking``: a run drifting into length
  under a tiny fixed β alarms, one held by the adaptive controller does not; the file logger's JSONL
  gives the same alerts offline; ``stop_on_alarm`` ends the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings

import datasets
import pytest
import torch
import transformers
import trl
from helpers import CHARS, char_tokenizer
from test_ppo import EOS, PAD, base_config, build

from rlhf_fast.monitor import RewardHackingMonitor, analyse, load
from rlhf_fast.training import train
from rlhf_fast.training.checkpoint import load as load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def triples(alerts):
    return [(a["step"], a["signal"], a["severity"]) if isinstance(a, dict) else (a.step, a.signal, a.severity)
            for a in alerts]


# ----------------------------------------------------------------------------- rlhf_fast's PPO loop


def _eager_alarm_monitor():
    """A monitor told the run may spend 1e-6 nats, reporting after one record: an alarm as soon as the KL moves."""
    return RewardHackingMonitor(trainer="rlhf_fast", kl_budget=1e-6, persistence=1)


def test_the_loop_runs_the_monitor_by_default(tmp_path):
    policy, ref, reward_model, prompts = build()
    cfg = base_config(tmp_path, steps=2, adaptive_kl=True, kl_coef=0.1, kl_target=0.5)
    assert cfg.monitor and not cfg.stop_on_alarm
    records = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"])
    for record in records:
        assert {"score_std", "adv_frac_large", "kl_target"} <= set(record.metrics)
        assert record.metrics["kl_target"] == 0.5 and 0 <= record.metrics["adv_frac_large"] <= 1
        assert isinstance(record.alerts, list)
    with pytest.raises(ValueError, match="stop_on_alarm needs monitor=True"):
        base_config(tmp_path, monitor=False, stop_on_alarm=True)
    off = base_config(tmp_path / "off", steps=1, monitor=False)
    with pytest.raises(ValueError, match="cfg.monitor is False"):
        train(off, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"],
              monitor=_eager_alarm_monitor())
    from rlhf_fast.training.cli import field_help
    from rlhf_fast.training.config import PPOConfig

    assert "reward-hacking monitor" in field_help(PPOConfig)["monitor"]
    assert "alarm" in field_help(PPOConfig)["stop_on_alarm"]


def test_alerts_go_to_metrics_jsonl_and_the_progress_display(tmp_path, capsys):
    policy, ref, reward_model, prompts = build()
    cfg = base_config(tmp_path, steps=3, progress=True)
    records = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"],
                    monitor=_eager_alarm_monitor())
    # the first step with a KL above twice the declared 1e-6 raises the alarm (step 1 samples from the reference)
    first = next(r.step for r in records if r.metrics["kl_ref_k1_sum"] >= 2e-6)
    alarms = [(r.step, a) for r in records for a in r.alerts if a["severity"] == "alarm"]
    assert alarms[0][0] == first and alarms[0][1]["signal"] == "kl_budget"
    assert "Change: hold the KL to the reference at 1e-06 nats/reply" in alarms[0][1]["message"]
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [line.get("monitor", []) for line in lines] == [r.alerts for r in records]
    assert f"monitor ALARM step {first}: Reward hacking likely." in capsys.readouterr().out
    offline = analyse(load(cfg.out_dir), kl_budget=1e-6, persistence=1)
    assert triples(offline.alerts) == [t for r in records for t in triples(r.alerts)]


def test_stop_on_alarm_checkpoints_and_a_resume_keeps_the_alerts(tmp_path):
    policy, ref, reward_model, prompts = build()
    cfg = base_config(tmp_path, steps=4, stop_on_alarm=True, checkpoint_every=3)
    records = train(cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"],
                    monitor=_eager_alarm_monitor())
    stop = next(r.step for r in records if r.metrics["kl_ref_k1_sum"] >= 2e-6)
    assert stop < 4 and [r.step for r in records] == list(range(1, stop + 1))
    state = load_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"))
    assert state["step"] == stop and [r["alerts"] for r in state["records"]] == [r.alerts for r in records]
    resumed_cfg = base_config(tmp_path, steps=4, stop_on_alarm=False, checkpoint_every=3, resume=True)
    monitor = _eager_alarm_monitor()
    resumed = train(resumed_cfg, policy, ref, reward_model, prompts, eos_token_id=EOS, pad_token_id=PAD["gpt2"],
                    monitor=monitor)
    assert [r.step for r in resumed] == [1, 2, 3, 4]
    assert [r.alerts for r in resumed[:stop]] == [r.alerts for r in records]
    assert monitor.history.records == 4  # replayed the steps done, then saw the rest
    assert not [a for r in resumed[stop:] for a in r.alerts if a["signal"] == "kl_budget"]  # raised once, before


# ----------------------------------------------------------------------------- TRL: the second world

@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(CHARS) + 2, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def pays_for_length(completions, **_):
    """The whole reward is the completion's length: gamed by never ending."""
    return [float(len(c)) for c in completions]


def pays_for_first_a(completions, **_):
    """1 when the completion starts with 'a': length cannot game it."""
    return [1.0 if c.startswith("a") else 0.0 for c in completions]


def _grpo(policy, tmp_path, reward, ours: bool, callback, steps: int = 20, beta: float = 0.04):
    """GRPO with β = 0.04 (TRL's former default: per-token ceiling 1/(2β²) ≈ 300 nats, i.e. no bound)."""
    from rlhf_fast.integrations.trl import RLHFFastGRPOTrainer

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=8,
                          max_completion_length=16, max_steps=steps, learning_rate=0.05,
                          lr_scheduler_type="constant", beta=beta, bf16=False, logging_steps=1, report_to=[],
                          seed=0, use_cpu=True, save_strategy="no", disable_tqdm=True)
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"] * 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            cls = RLHFFastGRPOTrainer if ours else trl.GRPOTrainer
            trainer = cls(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=char_tokenizer(), callbacks=[callback])
            trainer.train()
        finally:
            logging.disable(logging.NOTSET)
    return trainer


@pytest.mark.parametrize("ours", [True, False], ids=["rlhf_fast-integration", "plain-trl"])
def test_trl_world_that_pays_for_length_alarms_and_one_it_cannot_game_does_not(tiny_policy, tmp_path, ours):
    from rlhf_fast.integrations.trl_monitor import RewardHackingCallback

    gamed = RewardHackingCallback(stop_on_alarm=True)
    trainer = _grpo(tiny_policy, tmp_path / "gamed", pays_for_length, ours, gamed)
    alarm = next(a for a in gamed.alerts if a.severity == "alarm")
    assert alarm.signal == "kl_drift+length_coupling" and alarm.step <= 20 / 4 * 3
    assert trainer.state.global_step == alarm.step  # stop_on_alarm ended the run at the alarm
    assert "GRPOConfig(beta=" in alarm.message
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))  # offline: the same alerts from TRL's log
    assert triples(analyse(load(str(tmp_path / "trainer_state.json")), beta=0.04).alerts) == triples(gamed.alerts)
    if ours:  # the integration's within-batch correlation and per-token KL
        assert "within-batch score–length correlation" in alarm.message
        assert "The KL is carried by: '" in alarm.message
        history = [h for h in trainer.state.log_history if "rlhf_fast/advantage_length_corr" in h]
        assert history and history[0]["rlhf_fast/advantage_length_corr"] > 0.5
    else:
        assert "changes of score and length from step to step correlate" in alarm.message
    clean = RewardHackingCallback(stop_on_alarm=True)
    trainer = _grpo(tiny_policy, tmp_path / "clean", pays_for_first_a, ours, clean)
    assert trainer.state.global_step == 20
    assert not [a for a in clean.alerts if a.severity == "alarm"]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert rewards[-1] > rewards[0] + 0.5  # it did learn: no alarm is not for lack of optimisation
    assert "kl_drift" in {a.signal for a in clean.alerts}  # the drift is seen, and is not called hacking


def test_trl_default_beta_zero_logs_no_kl_and_still_alarms(tiny_policy, tmp_path):
    """TRL's default β = 0: no reference model, no KL logged; the rising proxy stands for the drift."""
    from rlhf_fast.integrations.trl_monitor import RewardHackingCallback

    callback = RewardHackingCallback(stop_on_alarm=True)
    trainer = _grpo(tiny_policy, tmp_path, pays_for_length, True, callback, beta=0.0)
    assert not any("kl" in h for h in trainer.state.log_history)
    alarm = next(a for a in callback.alerts if a.severity == "alarm")
    assert alarm.signal == "kl_drift+length_coupling" and "there is no KL penalty (β = 0)" in alarm.message
    assert trainer.state.global_step == alarm.step


# ----------------------------------------------------------------------------- verl


def _apply_kl_penalty(data, kl_ctrl):
    """verl's ``ray_trainer.apply_kl_penalty`` (that module needs torchdata, which the light verl install of
    the tests leaves out): k1 from ``core_algos.kl_penalty``, −β·k1 in the rewards, the controller's update,
    and the metric names of the installed verl's source (checked in the test)."""
    from verl.trainer.ppo import core_algos
    from verl.utils.torch_functional import masked_mean

    mask = data.batch["response_mask"]
    kld = core_algos.kl_penalty(data.batch["old_log_probs"], data.batch["ref_log_prob"], kl_penalty="kl") * mask
    beta = kl_ctrl.value
    data.batch["token_level_rewards"] = data.batch["token_level_scores"] - beta * kld
    current = torch.mean(masked_mean(kld, mask=mask, axis=-1), dim=0).item()
    kl_ctrl.update(current_kl=current, n_steps=mask.shape[0])
    return data, {"actor/reward_kl_penalty": current, "actor/reward_kl_penalty_coeff": beta}


def _verl_step(step: int, kl_ctrl, lengths, scores, kl_per_token: float, generator) -> dict:
    """One step's metrics from verl's own functions on a synthetic batch: compute_data_metrics and the KL
    penalty with verl's controllers (the dict RayPPOTrainer.fit logs, its actor metrics under verl's names)."""
    from verl import DataProto
    from verl.trainer.ppo.metric_utils import compute_data_metrics

    batch, prompt, width = len(lengths), 4, 16
    lengths = torch.as_tensor(lengths).clamp(1, width)
    response_mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    scores_t = torch.as_tensor(scores, dtype=torch.float32)
    token_scores = torch.zeros(batch, width)
    token_scores[torch.arange(batch), lengths - 1] = scores_t
    ref = -2.0 + 0.1 * torch.randn(batch, width, generator=generator)
    data = DataProto.from_dict(tensors={
        "prompts": torch.ones(batch, prompt, dtype=torch.long),
        "responses": torch.ones(batch, width, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(batch, prompt), response_mask], 1).long(),
        "response_mask": response_mask, "token_level_scores": token_scores,
        "old_log_probs": ref + kl_per_token, "ref_log_prob": ref,
    })
    data, kl_metrics = _apply_kl_penalty(data, kl_ctrl)
    advantages = ((scores_t - scores_t.mean()) / scores_t.std().clamp(min=1e-6))[:, None] * response_mask
    data.batch["advantages"], data.batch["returns"] = advantages, advantages
    metrics = compute_data_metrics(data, use_critic=False)
    metrics.update(kl_metrics)
    metrics.update({"actor/pg_clipfrac": 0.01, "actor/ppo_kl": 0.001, "actor/entropy": 1.0,
                    "training/global_step": step})
    return metrics


def _verl_run(kind: str, steps: int = 24):
    """("hacking"): lengths climb from 6 to 16 tokens, the score pays 0.5 per token, KL per token rises
    0.05/step under a fixed β = 0.001. ("held"): lengths stay near 8, the score improves for content, the
    KL per token settles at the adaptive controller's target of 0.1."""
    from verl.trainer.ppo.core_algos import AdaptiveKLController, FixedKLController

    generator = torch.Generator().manual_seed(0)
    if kind == "hacking":
        config = {"algorithm": {"use_kl_in_reward": True, "kl_ctrl": {"type": "fixed", "kl_coef": 0.001}},
                  "actor_rollout_ref": {"actor": {"clip_ratio": 0.2}}}
        ctrl = FixedKLController(0.001)
    else:
        config = {"algorithm": {"use_kl_in_reward": True,
                                "kl_ctrl": {"type": "adaptive", "kl_coef": 0.05, "target_kl": 0.1, "horizon": 1000}},
                  "actor_rollout_ref": {"actor": {"clip_ratio": 0.2}}}
        ctrl = AdaptiveKLController(0.05, 0.1, 1000)
    dicts = []
    for step in range(1, steps + 1):
        noise = torch.randint(-2, 3, (64,), generator=generator)
        if kind == "hacking":
            lengths = (6 + 10 * (step - 1) / (steps - 1) + noise).round().long()
            scores = 0.5 * lengths.float() + 0.3 * torch.randn(64, generator=generator)
            kl = 0.05 * (step - 1)
        else:
            lengths = (8 + noise).long()
            scores = 0.05 * step + torch.randn(64, generator=generator)
            kl = min(0.02 * (step - 1), 0.1)
        dicts.append(_verl_step(step, ctrl, lengths, scores, kl, generator))
    return config, dicts


def _tracked(config, dicts, tmp_path, monkeypatch, **install_options):
    from verl.utils.tracking import Tracking

    from rlhf_fast.integrations import verl_monitor

    log_file = tmp_path / "verl_metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log_file))
    verl_monitor.install(**install_options)
    try:
        tracker = Tracking(project_name="p", experiment_name="e", default_backend=["file"], config=config)
        stopped = None
        for step, metrics in enumerate(dicts, 1):
            try:
                tracker.log(data=metrics, step=step)
            except verl_monitor.RewardHackingStop as exc:
                stopped = (step, str(exc))
                break
        tracker.logger["file"].finish()
    finally:
        verl_monitor.install()  # the defaults again for the rest of the session
    return tracker._rlhf_fast_monitor, log_file, stopped


def test_verl_hook_alarms_on_drift_into_length_and_not_under_the_controller(tmp_path, monkeypatch):
    import importlib.util

    trainer_source = os.path.join(os.path.dirname(importlib.util.find_spec("verl").origin), "trainer", "ppo",
                                  "ray_trainer.py")
    with open(trainer_source) as f:
        assert '{"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}' in f.read()
    config, dicts = _verl_run("hacking")
    assert {"actor/reward_kl_penalty", "critic/score/mean", "response_length/mean",
            "critic/advantages/max"} <= set(dicts[0])  # verl's own names
    hook, log_file, stopped = _tracked(config, dicts, tmp_path, monkeypatch)
    assert stopped is None
    alarm = hook.monitor.alarms[0]
    assert alarm.signal == "kl_drift+length_coupling" and alarm.step <= len(dicts) / 2
    assert "algorithm.kl_ctrl.type=adaptive" in alarm.message
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert logged[-1]["data"]["monitor/alarms"] == 1.0
    assert triples(analyse(load(str(log_file))).alerts) == triples(hook.alerts)

    config, dicts = _verl_run("held")
    (tmp_path / "held").mkdir()
    hook, log_file, _ = _tracked(config, dicts, tmp_path / "held", monkeypatch)
    assert hook.monitor.history.records == len(dicts)
    assert not hook.monitor.alarms, [a.message for a in hook.monitor.alarms]
    assert math.isclose(json.loads(log_file.read_text().splitlines()[-1])["data"]["rlhf_fast/kl_target"],
                        0.1 * dicts[-1]["response_length/mean"])
    assert triples(analyse(load(str(log_file))).alerts) == triples(hook.alerts)


def test_verl_stop_on_alarm_and_settings_from_config(tmp_path, monkeypatch):
    from rlhf_fast.integrations.verl_monitor import settings_from_config

    config, dicts = _verl_run("hacking")
    hook, _, stopped = _tracked(config, dicts, tmp_path, monkeypatch, stop_on_alarm=True,
                                alerts_path=str(tmp_path / "alerts.jsonl"))
    assert stopped is not None and stopped[0] == hook.monitor.alarms[0].step
    assert "stopped by the reward-hacking monitor" in stopped[1]
    written = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert written == [a.to_dict() for a in hook.alerts]
    assert settings_from_config({"actor_rollout_ref": {"actor": {"use_kl_loss": True, "clip_ratio_low": 0.2}}}) == \
        {"kl_penalty": "loss", "clip_eps": 0.2}
    assert settings_from_config({"algorithm": {"use_kl_in_reward": False}}) == {"beta": 0.0}
