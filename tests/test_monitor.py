"""The reward-hacking monitor (rlhf_fast.monitor): detectors on trajectories built to cross a threshold at a
step known by construction, ground truth never read, the offline loader and the ``monitor`` command, the
PPO loop's monitor (alerts in metrics.jsonl, stop_on_alarm, resume), and the case study's detection table.

Trajectories are rlhf_fast records (metric names of ``metrics.jsonl``) with a little seeded noise, so every
slope has a standard error; each test says which step a condition first holds by construction.
"""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from rlhf_fast.monitor import (
    ADAPTERS,
    DETECTORS,
    RewardHackingMonitor,
    TokenKL,
    analyse,
    canonical,
    load,
    token_kl_sums,
)
from rlhf_fast.monitor import detectors as det
from rlhf_fast.monitor.advice import _nice


def hacking(steps: int = 30, seed: int = 0, **extra):
    """A run with a small fixed β drifting steadily into length: KL 0.3 nats/reply per step, replies
    5% longer per step, a proxy whose within-batch score–length correlation is 0.6."""
    rng = random.Random(seed)
    out = []
    for t in range(1, steps + 1):
        noise = lambda scale: scale * rng.uniform(-1, 1)  # noqa: E731
        out.append({
            "step": t, "kl_ref_k1_sum": 0.3 * (t - 1) + noise(0.01), "kl_ref_k1_mean": 0.1 * (t - 1),
            "kl_coef": 0.01, "score_mean": 0.05 * t + noise(0.01), "score_std": 0.5,
            "response_length_mean": 2.6 * (1 + 0.05 * (t - 1)) + noise(0.01), "score_length_corr": 0.6 + noise(0.05),
            "ratio_above": 0.02, "ratio_below": 0.01, "clipfrac": 0.02, "approx_kl": 0.002,
            "adv_mean": 0.0, "adv_std": 1.0, "adv_max": 2.5, "adv_frac_large": 0.02, "entropy": 1.0 + noise(0.01),
            **extra,
        })
    return out


def controlled(steps: int = 40, seed: int = 0, peak: float = 1.5, budget: float = 2.0):
    """A run held by an adaptive controller at ``budget`` that overshoots to ``peak`` × budget for steps
    10–25 before the controller pulls it back, the same proxy and the same length drift early."""
    rng = random.Random(seed)
    out = []
    for t in range(1, steps + 1):
        kl = min(0.3 * (t - 1), peak * budget) if t <= 25 else budget + (peak - 1) * budget * math.exp(-(t - 25) / 3)
        out.append({
            "step": t, "kl_ref_k1_sum": kl + 0.01 * rng.uniform(-1, 1), "kl_coef": 0.15, "kl_target": budget,
            "score_mean": min(0.1 * t, 2.0), "score_std": 1.0,
            "response_length_mean": 2.6 * (1 + min(0.05 * (t - 1), 0.4)), "score_length_corr": 0.6,
            "ratio_above": 0.02, "ratio_below": 0.01, "adv_mean": 0.0, "adv_std": 1.0, "adv_max": 2.5,
            "entropy": 1.0,
        })
    return out


def run(records, **options):
    monitor = RewardHackingMonitor(trainer="rlhf_fast", **options)
    for record in records:
        monitor.update(record)
    return monitor


def triples(alerts):
    return [(a.step, a.signal, a.severity) for a in alerts]


# ----------------------------------------------------------------------------- detectors


def test_unbounded_drift_into_length_alarms_when_both_have_persisted():
    # length +25% first at step 6 -> length_coupling warning after 3 records, at step 8; the KL's projection
    # 0.3(t-1) + 0.3 t passes ln 100 = 4.6 at step 9 (beta = 0.01 bounds nothing) -> 3 records -> step 11
    monitor = run(hacking())
    assert (8, "length_coupling", "warning") in triples(monitor.alerts)
    alarm = monitor.alarms[0]
    assert (alarm.step, alarm.signal) == (11, "kl_drift+length_coupling")
    assert monitor.verdict == "alarm" and len(monitor.alarms) == 1
    kl_reached = max(r["kl_ref_k1_sum"] for r in hacking()[:11])
    budget = _nice(kl_reached / 2)
    beta = _nice(0.5 / math.sqrt(2 * budget))  # sigma / sqrt(2 budget)
    assert alarm.message.startswith("step 11: Reward hacking likely.")
    assert f"kl_target={budget:g}, kl_coef={beta:g}" in alarm.message, alarm.message
    assert "nothing bounds it" in alarm.message and "proxy pays for it" in alarm.message
    assert alarm.values["kl_budget"] == pytest.approx(math.log(100))
    assert alarm.values["length_drift"] > det.LENGTH_DRIFT
    assert alarm.to_dict() == {"step": 11, "signal": "kl_drift+length_coupling", "severity": "alarm",
                               "message": alarm.message}


def test_drift_alone_or_an_exploit_channel_alone_is_no_alarm():
    flat_length = [dict(r, response_length_mean=2.6) for r in hacking()]
    assert not run(flat_length).alarms  # drift, but not into length
    assert "kl_drift" in {a.signal for a in run(flat_length).alerts}
    no_payment = [dict(r, score_length_corr=0.0) for r in hacking()]
    assert not run(no_payment).alarms  # replies lengthen, but the proxy does not pay for it
    held = [dict(r, kl_coef=0.5) for r in hacking()]  # ceiling 0.5²/(2·0.25) = 0.5 nats: the penalty holds
    assert not run(held).alarms


def test_a_penalty_without_the_scores_spread_shows_no_bound():
    monitor = run([{k: v for k, v in r.items() if k != "score_std"} for r in hacking()])
    assert (monitor.alarms[0].step, monitor.alarms[0].signal) == (11, "kl_drift+length_coupling")
    assert "β = 0.01, and without the score's spread no ceiling can be shown below the budget" in \
        monitor.alarms[0].message


def test_without_a_kl_penalty_the_rising_proxy_stands_for_the_unmeasured_drift():
    # TRL with beta = 0 logs no KL: the score rising (from 4 records) is the drift, the step-to-step changes of
    # score and length correlate (from 9 records) -> both persistent at step 11
    rng = random.Random(0)
    records = []
    for t in range(1, 20):
        length = 8 + 0.5 * t + rng.uniform(-0.5, 0.5)
        records.append({"step": t, "reward": length + rng.uniform(-0.1, 0.1), "reward_std": 2.0,
                        "completions/mean_length": length, "clip_ratio/region_mean": 0.0, "entropy": 2.0})
    monitor = RewardHackingMonitor(trainer="trl", beta=0.0)
    for r in records:
        monitor.update(r)
    alarm = monitor.alarms[0]
    assert (alarm.step, alarm.signal) == (11, "kl_drift+length_coupling")
    assert "there is no KL penalty (β = 0)" in alarm.message and "at 4.6 nats/reply" in alarm.message
    unknown = RewardHackingMonitor(trainer="trl")  # β not told: no claim that nothing bounds it
    for r in records:
        unknown.update(r)
    assert not unknown.alarms


def test_a_controller_that_overshoots_warns_and_one_that_loses_control_alarms():
    healthy = run(controlled(peak=1.5))
    assert not healthy.alarms
    assert {"kl_budget", "length_coupling"} <= {a.signal for a in healthy.warnings}
    lost = run(controlled(peak=2.3))  # KL >= 2 x the target from step 15 (0.3·14 = 4.2 > 4.0) -> step 17
    alarm = lost.alarms[0]  # β stays at 0.15: nothing restores the budget
    assert (alarm.step, alarm.signal) == (17, "kl_budget")
    assert "the budget the controller lost" in alarm.message and "kl_target=2," in alarm.message
    # the same overshoot while the controller raises β 5% a step: β must grow by √2.3 ≈ 1.5, ~9 steps, fewer
    # than the run's age, so it is a transient
    catching_up = [dict(r, kl_coef=0.15 * 1.05 ** max(r["step"] - 8, 0)) for r in controlled(peak=2.3)]
    monitor = run(catching_up)
    assert not monitor.alarms
    budget = next(a for a in monitor.warnings if a.signal == "kl_budget")
    assert "the controller is raising β and needs ~" in budget.message


def test_a_single_record_never_raises_anything():
    records = controlled()
    records[15] = dict(records[15], kl_ref_k1_sum=40.0, response_length_mean=9.0, entropy=0.01)
    assert triples(run(records).alerts) == triples(run(controlled()).alerts)


def test_held_out_score_falling_while_the_proxy_rises_alarms_only_when_declared():
    records = hacking(response_length_mean=2.6, judge=0.0)  # no length drift: only the held-out evidence
    for r in records:
        r["judge"] = 1.0 - 0.05 * r["step"] + 0.01 * math.sin(r["step"])
    assert "held_out" not in {a.signal for a in run(records).alerts}
    monitor = run(records, held_out=["judge"])
    alarm = next(a for a in monitor.alarms if a.signal == "held_out")
    assert alarm.step == 6  # 4 records for a slope, then 3 in a row
    assert "'judge' is falling" in alarm.message


def test_warning_detectors_fire_at_their_thresholds():
    records = hacking(steps=8)
    for r in records:
        r.update(ratio_above=0.04, ratio_below=0.01, adv_max=4.5, adv_frac_large=0.0)
    for r in records[4:]:
        r["entropy"] = 0.45
    signals = {a.signal: a for a in run(records).alerts}
    assert signals["policy_movement"].step == 3 and signals["advantage_tail"].step == 3
    assert signals["entropy_collapse"].step == 7
    below = [dict(r, ratio_above=0.03, ratio_below=0.01, adv_max=3.9) for r in records]
    assert {"policy_movement", "advantage_tail"}.isdisjoint(a.signal for a in run(below).alerts)


def test_bound_from_controller_penalty_or_nothing():
    from rlhf_fast.monitor.state import History, MonitorConfig

    def bound_of(record, **config):
        h = History(MonitorConfig(**config), config.get("kl_penalty", "reward"))
        h.add(1, canonical(record, ADAPTERS["rlhf_fast"]))
        return det.bound(h)

    assert bound_of({"kl_target": 3.0, "kl_coef": 0.1}).kind == "controller"
    b = bound_of({"kl_coef": 0.1, "score_std": 1.0})
    assert b.ceiling == pytest.approx(50.0) and not b.holds and not b.declared
    assert bound_of({"kl_coef": 0.1, "score_std": 1.0}, kl_budget=60.0).holds
    assert math.isinf(bound_of({"kl_coef": 0.0}).ceiling)
    loss = bound_of({"kl_coef": 0.5, "response_length_mean": 4.0}, kl_penalty="loss")
    assert loss.ceiling == pytest.approx(4.0 / (2 * 0.25))  # per token 1/(2β²), times the length
    assert bound_of({"score_std": 1.0}).ceiling is None  # β unknown


def test_thresholds_are_the_reasoned_numbers():
    assert det.MOVEMENT_SHARE == pytest.approx(2 * 0.5 * math.erfc(2 / math.sqrt(2)))  # 2·Φ(−2)
    assert det.MOVEMENT_SHARE == pytest.approx(0.0455, abs=1e-4)
    assert det.CLIPFRAC_SHARE == pytest.approx(0.0228, abs=1e-4)
    assert det.DEFAULT_KL_BUDGET == pytest.approx(4.605, abs=1e-3)
    assert set(DETECTORS) == {"kl_budget", "kl_drift", "policy_movement", "advantage_tail", "length_coupling",
                              "entropy_collapse", "held_out"}
    for fn in DETECTORS.values():
        assert fn.__doc__ and len(fn.__doc__) > 40


def test_invalid_settings_raise_naming_them():
    with pytest.raises(ValueError, match="kl_budget must be > 0"):
        RewardHackingMonitor(kl_budget=0)
    with pytest.raises(ValueError, match="trainer must be"):
        RewardHackingMonitor(trainer="openrlhf")
    with pytest.raises(ValueError, match="kl_penalty"):
        RewardHackingMonitor(kl_penalty="both")


# ----------------------------------------------------------------------------- ground truth stays out


def _behaviour_keys():
    from rlhf_fast.casestudy import world

    prompts = world.sample_prompts(8, random.Random(0), 0.5)
    return set(world.behaviour(prompts, [world.encode("REFUSE EOS")] * 8, world.GoldJudge()))


def test_the_case_studys_evaluation_numbers_are_never_read():
    keys = _behaviour_keys()
    assert {"gold", "refusal_rate", "salesy_share"} <= keys
    named = {k for adapter in ADAPTERS.values() for names in adapter.names.values() for k in names}
    assert not keys & named
    for make in (hacking, controlled):
        plain = make()
        rng = random.Random(1)
        with_truth = [dict(r, **{k: rng.uniform(-50, 50) for k in keys}) for r in plain]
        assert [canonical(r, ADAPTERS["rlhf_fast"]) for r in with_truth] == \
            [canonical(r, ADAPTERS["rlhf_fast"]) for r in plain]
        assert [a.to_dict() for a in run(with_truth).alerts] == [a.to_dict() for a in run(plain).alerts]
    collapsing_gold = [dict(r, gold=-10.0 * r["step"], refusal_rate=0.0) for r in controlled()]
    assert not run(collapsing_gold).alarms  # what the user cannot see cannot raise an alarm


# ----------------------------------------------------------------------------- adapters, tokens


def test_trl_and_verl_names_map_to_the_signals():
    trl = {"kl": 0.2, "reward": 1.5, "reward_std": 0.7, "completions/mean_length": 10.0,
           "clip_ratio/region_mean": 0.03, "entropy": 1.2, "rlhf_fast/advantage_length_corr": 0.4, "loss": 0.1}
    assert canonical(trl, ADAPTERS["trl"]) == {
        "kl_token": 0.2, "kl": pytest.approx(2.0), "score": 1.5, "score_std": 0.7, "length": 10.0,
        "clipfrac": 0.03, "entropy": 1.2, "score_length_corr": 0.4}
    verl = {"actor/reward_kl_penalty": 0.05, "actor/reward_kl_penalty_coeff": 0.001, "critic/score/mean": 0.3,
            "critic/score/max": 1.0, "critic/score/min": -1.0, "response_length/mean": 100.0,
            "actor/pg_clipfrac": 0.01, "actor/ppo_kl": 0.001, "critic/advantages/max": 3.0, "actor/entropy": 0.9,
            "val-core/acc": 0.5}
    assert canonical(verl, ADAPTERS["verl"]) == {
        "kl_token": 0.05, "kl": pytest.approx(5.0), "beta": 0.001, "score": 0.3, "score_range": 2.0,
        "length": 100.0, "clipfrac": 0.01, "approx_kl": 0.001, "adv_max": 3.0, "entropy": 0.9}
    from rlhf_fast.monitor.signals import detect, kl_penalty_of

    assert (detect(trl), detect(verl), detect(hacking()[0])) == ("trl", "verl", "rlhf_fast")
    assert kl_penalty_of(ADAPTERS["verl"], verl) == "reward"
    assert kl_penalty_of(ADAPTERS["verl"], {"actor/kl_loss": 0.1}) == "loss"
    assert canonical({"kl_ref_k1_sum": float("nan"), "entropy": True}, ADAPTERS["rlhf_fast"]) == {}


def test_token_kl_sums_add_up_to_the_kl_per_reply_and_rank_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (4, 5), generator=g)
    lp, ref = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    sums = token_kl_sums(lp, ref, ids, mask)
    per_reply = float(((lp - ref) * mask).sum(1).mean())
    assert sum(sums.values()) == pytest.approx(per_reply, abs=1e-6)
    assert set(sums) == set(ids[mask].tolist())
    tracker = TokenKL(window=2, top_k=2, decode=lambda i: "UPGRADE" if i == 7 else f"t{i}")
    tracker.add({7: 3.0, 2: 1.0, 3: -0.5})
    tracker.add({7: 1.0, 2: 2.0, 3: -0.5})
    tracker.add({7: 1.0, 2: 1.0})  # the window keeps the last two steps
    top = tracker.top()
    assert [t.token_id for t in top] == [2, 7] and top[0].kl == pytest.approx(1.5)
    assert top[0].share == pytest.approx(0.6)  # of the positive KL: 3 of 5 nats
    assert tracker.describe() == "'t2' 1.50 nats (60%), 'UPGRADE' 1.00 nats (40%)"
    broken = TokenKL(decode=lambda i: 1 / 0)
    broken.add({5: 1.0})
    assert broken.describe() == "token 5 1.00 nats (100%)"


# ----------------------------------------------------------------------------- offline formats and the command


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_every_format_gives_the_same_alerts(tmp_path):
    records = hacking()
    want = triples(run(records).alerts)
    folder = tmp_path / "run"
    folder.mkdir()
    _write_jsonl(folder / "metrics.jsonl", records)
    csv_path = tmp_path / "export.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["_step", *[k for k in records[0] if k != "step"]])
        writer.writeheader()
        for r in records:
            writer.writerow({"_step": r["step"], **{k: v for k, v in r.items() if k != "step"}})
    wrapped = _write_jsonl(tmp_path / "verl_file_logger.jsonl", [{"step": r["step"], "data": r} for r in records])
    for path in (folder, folder / "metrics.jsonl", csv_path, wrapped):
        assert triples(analyse(load(str(path))).alerts) == want, path


def test_trainer_state_json_and_case_study_config(tmp_path):
    logs = [{"step": r["step"], "kl": r["kl_ref_k1_sum"] / r["response_length_mean"], "reward": r["score_mean"],
             "reward_std": 0.5, "completions/mean_length": r["response_length_mean"],
             "rlhf_fast/advantage_length_corr": 0.6, "clip_ratio/region_mean": 0.0, "entropy": 1.0, "loss": 0.0}
            for r in hacking()]
    logs.append({"step": 30, "train_runtime": 1.0, "train_loss": 0.0})  # TRL's closing summary
    checkpoint = tmp_path / "out" / "checkpoint-30"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": logs}))
    (tmp_path / "out" / "checkpoint-5").mkdir()
    (tmp_path / "out" / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"log_history": logs[:5]}))
    loaded = load(str(tmp_path / "out"))
    assert loaded.trainer == "trl" and loaded.source.endswith("checkpoint-30/trainer_state.json")
    monitor = analyse(loaded, beta=0.0)
    assert monitor.alarms and monitor.alarms[0].signal == "kl_drift+length_coupling"
    assert "there is no KL penalty" in monitor.alarms[0].message and "GRPOConfig(beta=" in monitor.alarms[0].message
    # an older case-study run: the controller's target and the reward's scale come from its config.json
    folder = tmp_path / "fix"
    folder.mkdir()
    old = [{k: v for k, v in r.items() if k not in ("kl_target", "score_std")} | {"score_norm_std": 1.0,
                                                                                    "score_raw_std": 9.0}
           for r in controlled()]
    _write_jsonl(folder / "metrics.jsonl", old)
    (folder / "config.json").write_text(json.dumps({"ppo_config": {"adaptive_kl": True, "kl_target": 2.0,
                                                                   "reward_normalize": True, "clip_eps": 0.2,
                                                                   "kl_placement": "reward"}}))
    loaded = load(str(folder))
    assert all(r["kl_target"] == 2.0 and r["score_std"] == 1.0 for r in loaded.records)
    assert triples(analyse(loaded).alerts) == triples(run(controlled()).alerts)


def _monitor_command(capsys, *args):
    """``python -m rlhf_fast monitor ARGS`` in this process: (exit code, stdout, stderr)."""
    from rlhf_fast.__main__ import main

    capsys.readouterr()
    code = main(["monitor", *map(str, args)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_monitor_command_json_text_and_plot(tmp_path, capsys):
    hacked, healthy = tmp_path / "hacked", tmp_path / "healthy"
    for folder, records in ((hacked, hacking()), (healthy, [dict(r, response_length_mean=2.6) for r in controlled()])):
        folder.mkdir()
        _write_jsonl(folder / "metrics.jsonl", records)
    out = subprocess.run([sys.executable, "-m", "rlhf_fast", "monitor", str(hacked), "--json", "--plot",
                          str(tmp_path / "fig.png")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["verdict"] == "alarm"
    assert all(set(a) == {"step", "signal", "severity", "message"} for a in report["alarms"])
    assert {a["severity"] for a in report["alarms"]} == {"warning", "alarm"}
    first = next(a for a in report["alarms"] if a["severity"] == "alarm")
    assert (first["step"], first["signal"]) == (11, "kl_drift+length_coupling")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quiet = json.loads(_monitor_command(capsys, healthy, "--json").stdout)
    assert quiet["verdict"] == "warning" and not [a for a in quiet["alarms"] if a["severity"] == "alarm"]
    text = _monitor_command(capsys, hacked)
    assert text.returncode == 0 and "ALARM [kl_drift+length_coupling] step 11:" in text.stdout
    assert "verdict: ALARM: reward hacking likely (first alarm at step 11)" in text.stdout


def test_no_alert_gives_an_empty_list(tmp_path, capsys):
    steady = [dict(r, kl_ref_k1_sum=0.5, response_length_mean=2.6) for r in controlled()]
    path = _write_jsonl(tmp_path / "metrics.jsonl", steady)
    report = json.loads(_monitor_command(capsys, path, "--json").stdout)
    assert report["alarms"] == [] and report["verdict"] == "ok"


@pytest.mark.parametrize("case", ["missing", "not-json", "array-line", "no-metrics", "empty-csv", "extension",
                                  "budget", "plot-name", "empty-folder", "bad-state"])
def test_monitor_command_bad_input_is_one_error_line(tmp_path, capsys, case):
    path = tmp_path / "metrics.jsonl"
    args = [path]
    if case == "missing":
        args = [tmp_path / "nope"]
    elif case == "not-json":
        path.write_text('{"step": 1}\n{oops\n')
    elif case == "array-line":
        path.write_text("[1, 2]\n")
    elif case == "no-metrics":
        path.write_text('{"step": 1, "gold": 0.5, "refusal_rate": 1.0}\n')
    elif case == "empty-csv":
        args = [tmp_path / "x.csv"]
        (tmp_path / "x.csv").write_text("")
    elif case == "extension":
        args = [tmp_path / "x.txt"]
        (tmp_path / "x.txt").write_text("1")
    elif case == "budget":
        _write_jsonl(path, hacking())
        args = [path, "--kl-budget", "-1"]
    elif case == "plot-name":
        _write_jsonl(path, hacking())
        args = [path, "--plot", tmp_path / "fig"]
    elif case == "empty-folder":
        args = [tmp_path]
    else:
        args = [tmp_path / "trainer_state.json"]
        (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    out = _monitor_command(capsys, *args, "--json")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m rlhf_fast monitor: error: "), out.stderr
    assert "Traceback" not in out.stderr


def test_the_documented_example_runs():
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "monitor.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) == 1
    done = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[:2] == ["warning 8 length_coupling", "alarm 11 kl_drift+length_coupling"]
    assert "alarm hold the KL to the reference at 1.5 nats/reply" in done.stdout


def test_case_study_detection_rows_and_tables(tmp_path):
    from rlhf_fast.casestudy import detection

    seed = tmp_path / "seed0"
    entries = {"reference": {"gold": 1.0, "refusal_rate": 0.99},
               "baseline": {"gold": -1.0, "refusal_rate": 0.0},  # hacked: gold below the reference's
               "fix": {"gold": 1.5, "refusal_rate": 0.97},  # healthy: gold up, refusals within 5 points
               "ablations": {"tight-clip": {"gold": 1.2, "refusal_rate": 0.90}}}  # hacked: refusals -9 points
    for name, records in (("baseline", hacking()), ("fix", controlled()), ("tight-clip", controlled())):
        (seed / name).mkdir(parents=True)
        golds = [1.0 - 0.1 * max(r["step"] - 12, 0) if name == "baseline" else 1.0 for r in records]
        _write_jsonl(seed / name / "metrics.jsonl", [dict(r, gold=g) for r, g in zip(records, golds, strict=True)])
    (seed / "summary.json").write_text(json.dumps(entries))
    rows = {r["run"]: r for r in detection.detection_rows(str(tmp_path))}
    assert {k: r["label"] for k, r in rows.items()} == {"baseline": "hacked", "fix": "healthy", "tight-clip": "hacked"}
    base = rows["baseline"]
    # gold falls 0.1 a step after step 12; the 10-step mean ending at step T is 1 − 0.1·mean(0..T−12 tail):
    # at step 21 it is 1 − 0.45 = 0.55, at step 22 1 − 0.55 = 0.45 < 1.0 − 0.5
    assert detection.gold_step([{"step": r["step"], "gold": g} for r, g in zip(
        hacking(), [1.0 - 0.1 * max(t - 12, 0) for t in range(1, 31)], strict=True)], 1.0) == 22
    assert (base["first_alarm"], base["gold_step"], base["lead"]) == (11, 22, 11)
    assert not base["within_first_quarter"] and rows["fix"]["first_alarm"] is None  # 11 > 30 steps / 4
    table = detection.detection_table(list(rows.values()))
    assert "| raised an `alarm` | 1/2 (50%) (recall) | 0/1 (0%) (false alarms) |" in table
    assert "| first alarm within the first quarter (each run's first quarter) | 0/2 (0%) | — |" in table
    assert "| tight-clip | 1 / 0 | 0/1 | — | — | — |" in detection.changes_table(list(rows.values()))
    assert "| 0 | baseline | hacked (-1.00 vs +1.00, 0% vs 99%) | 11 (kl_drift+length_coupling) | 22 | +11 |" in \
        detection.runs_table(list(rows.values()))
