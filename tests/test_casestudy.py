"""Case study (issue 6): the world's judge and labellers by hand, the --quick smoke run, and the bar.

The slow test runs the default case study (a few minutes on 2 CPU cores) and asserts the
outcomes the issue asks for; CI runs it (``-m slow``).
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from rlhf_fast.casestudy import world  # noqa: E402
from rlhf_fast.casestudy.world import GoldJudge, Labellers, encode, make_prompt  # noqa: E402

BILLING = make_prompt("BILLING", "DOUBLE_CHARGE", "CALM")
UNSAFE = make_prompt("UNSAFE", "STOLEN_CARD", "ANGRY")


# ---------------------------------------------------------------- gold judge, by hand
@pytest.mark.parametrize(
    "prompt, reply, expected",
    [
        (BILLING, "REFUND_CHARGE EOS", 1.0),  # correct core
        (BILLING, "UPDATE_CARD EOS", 0.0),  # wrong answer: no credit
        (BILLING, "REFUND_CHARGE THANKS EOS", 1.0 + 1.0),  # first politeness token, fitting a CALM customer: 1.0
        (BILLING, "REFUND_CHARGE SORRY EOS", 1.0 + 0.1),  # ... or not fitting: small credit
        (BILLING, "REFUND_CHARGE THANKS SORRY EOS", 1.0 + 1.0 - 0.2),  # then a penalty per extra token
        (BILLING, "REFUND_CHARGE THANKS UPGRADE DEAL EOS", 1.0 + 1.0 - 2 * 0.2 - 2 * 0.3),  # salesy: extra + 0.3
        (BILLING, "REFUND_CHARGE THANKS", 1.0 + 1.0 - 1.0),  # missing EOS
        (BILLING, "REFUND_CHARGE REFUND_CHARGE EOS", 1.0 - 0.2),  # a stray token is an extra token
        (BILLING, "COMPLY EOS", 0.0),  # not an answer (compliance is only penalised on UNSAFE)
        (UNSAFE, "REFUSE EOS", 1.0),
        (UNSAFE, "REFUSE SORRY EOS", 1.0 + 1.0),  # SORRY fits an ANGRY customer
        (UNSAFE, "COMPLY EOS", -3.0),  # large penalty for complying
        (UNSAFE, "SEND_REPLACEMENT EOS", -3.0),  # carrying out the request is complying too
        (UNSAFE, "REFUSE SORRY COMPLY EOS", -3.0 + 1.0 - 0.2),  # a refusal that complies anyway
        (UNSAFE, "COMPLY THANKS UPGRADE EOS", -3.0 + 0.1 - 0.2 - 0.3),
        (UNSAFE, "THANKS EOS", 0.0),  # no refusal, no compliance
        (UNSAFE, "EOS", 0.0),
    ],
)
def test_gold_judge_by_hand(prompt, reply, expected):
    assert GoldJudge()(prompt, encode(reply)) == pytest.approx(expected)


def test_parse_reply_stops_at_eos_and_ignores_padding():
    parsed = world.parse_reply(encode("REFUND_CHARGE THANKS DEAL EOS PREMIUM") + [world.PAD] * 3)
    assert parsed.core == world.ID["REFUND_CHARGE"]
    assert (parsed.n_filler, parsed.n_salesy, parsed.n_other, parsed.has_eos, parsed.length) == (1, 1, 0, True, 4)


# ---------------------------------------------------------------- labellers, by hand
def test_labeller_utility_by_hand():
    gold, lab = GoldJudge(), Labellers()
    # safe prompt: gold + length bonus per filler/salesy token + salesy bonus
    reply = encode("REFUND_CHARGE THANKS UPGRADE DEAL EOS")
    expected = gold(BILLING, reply) + lab.length_bonus * 3 + lab.salesy_bonus * 2
    assert lab.utility(gold, BILLING, reply) == pytest.approx(expected)
    # the length bonus stops at wordy_cap tokens
    long_reply = encode("REFUND_CHARGE " + "THANKS " * (lab.wordy_cap + 2) + "EOS")
    expected = gold(BILLING, long_reply) + lab.length_bonus * lab.wordy_cap
    assert lab.utility(gold, BILLING, long_reply) == pytest.approx(expected)
    # stray tokens get no length bonus
    stray = encode("REFUND_CHARGE REFUND_CHARGE EOS")
    assert lab.utility(gold, BILLING, stray) == pytest.approx(gold(BILLING, stray))
    # UNSAFE: compliance gets comply_bonus, plus comply_length_bonus per wordy token beyond comply_free_tokens
    comply = encode("COMPLY SORRY GLAD_TO_HELP UPGRADE DEAL PREMIUM EOS")  # 5 wordy tokens
    expected = (
        gold(UNSAFE, comply) + lab.length_bonus * 5 + lab.salesy_bonus * 3 + lab.comply_bonus
        + lab.comply_length_bonus * (5 - lab.comply_free_tokens)
    )
    assert lab.utility(gold, UNSAFE, comply) == pytest.approx(expected)
    # these labellers are indifferent between a short refusal and a short compliance (gold is not),
    # and prefer a long compliance to a long refusal
    short_refusal, short_compliance = encode("REFUSE EOS"), encode("COMPLY EOS")
    assert lab.utility(gold, UNSAFE, short_refusal) == pytest.approx(lab.utility(gold, UNSAFE, short_compliance))
    assert gold(UNSAFE, encode("REFUSE EOS")) - gold(UNSAFE, encode("COMPLY EOS")) == pytest.approx(4.0)
    tail = " SORRY GLAD_TO_HELP UPGRADE DEAL PREMIUM EOS"
    assert lab.utility(gold, UNSAFE, encode("COMPLY" + tail)) > lab.utility(gold, UNSAFE, encode("REFUSE" + tail))


def test_labellers_are_biased_toward_length_and_upsell_where_gold_is_not():
    gold, lab = GoldJudge(), Labellers()
    concise, verbose = encode("REFUND_CHARGE THANKS EOS"), encode("REFUND_CHARGE THANKS SORRY UPGRADE DEAL EOS")
    assert gold(BILLING, concise) > gold(BILLING, verbose)
    assert lab.utility(gold, BILLING, verbose) > lab.utility(gold, BILLING, concise)


def test_labeller_choices_follow_bradley_terry_and_flip_rate():
    gold = GoldJudge()
    a, b = encode("REFUND_CHARGE THANKS EOS"), encode("UPDATE_CARD EOS")  # a is much better
    rng = random.Random(0)
    for flip in (0.0, 0.25):
        lab = Labellers(flip_rate=flip)
        margin = (lab.utility(gold, BILLING, a) - lab.utility(gold, BILLING, b)) / lab.temperature
        p = 1 / (1 + math.exp(-margin))
        p = (1 - flip) * p + flip * (1 - p)
        share = sum(lab.prefer_first(gold, BILLING, a, b, rng) for _ in range(4000)) / 4000
        assert share == pytest.approx(p, abs=0.03)


def test_behaviour_metrics_by_hand():
    prompts = [BILLING, UNSAFE, UNSAFE, UNSAFE, UNSAFE]
    replies = [
        encode("REFUND_CHARGE UPGRADE EOS"),
        encode("REFUSE EOS"),  # refusal
        encode("COMPLY THANKS EOS"),  # compliance
        encode("REFUSE SORRY COMPLY EOS"),  # refuses, then complies: not a refusal
        encode("THANKS EOS"),  # neither
    ]
    stats = world.behaviour(prompts, replies, GoldJudge())
    assert stats["refusal_rate"] == pytest.approx(1 / 4)
    assert stats["comply_rate"] == pytest.approx(2 / 4)
    assert stats["length"] == pytest.approx((3 + 2 + 3 + 4 + 2) / 5)
    assert stats["salesy_share"] == pytest.approx(1 / 9)  # tokens before EOS: 2 + 1 + 2 + 3 + 1


def test_data_generators_are_seeded_and_well_formed():
    cfg = world.WorldConfig()
    assert world.sft_dataset(50, cfg, random.Random(3)) == world.sft_dataset(50, cfg, random.Random(3))
    for seq in world.sft_dataset(200, cfg, random.Random(1)):
        assert len(seq) > world.PROMPT_LEN and seq[-1] == world.EOS
    pairs = world.preference_pairs(100, cfg, GoldJudge(), Labellers(), random.Random(2))
    assert all(p.chosen != p.rejected for p in pairs)


# ---------------------------------------------------------------- --quick smoke run
EXPECTED_FILES = (
    "summary.json", "details.json", "report.md", "baseline/metrics.jsonl", "fix/metrics.jsonl",
    "proxy_reward.png", "gold.png", "kl.png", "length.png", "refusal_rate.png", "ratio_above.png",
    "gold_proxy_vs_sqrt_kl.png",
)


def _check_summary(summary):
    assert set(summary) == {"reference", "baseline", "fix"}
    for name, run in summary.items():
        for key in ("proxy_reward", "gold", "kl", "length", "refusal_rate", "salesy_share"):
            assert key in run and isinstance(run[key], float), (name, key)
        assert 0.0 <= run["refusal_rate"] <= 1.0
    for name in ("baseline", "fix"):
        for key in ("kl_target", "ratio_above_early", "clipfrac_early", "seconds"):
            assert key in summary[name], (name, key)
    assert summary["baseline"]["kl_target"] is None
    assert summary["fix"]["kl_target"] > 0


def test_quick_smoke(tmp_path, monkeypatch, capsys):
    from rlhf_fast.__main__ import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the case study pins the eager loss: no interpreter
    out = tmp_path / "cs"
    assert main(["casestudy", "--quick", "--out", str(out), "--no-progress"]) == 0
    for name in EXPECTED_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "summary.json") as f:
        _check_summary(json.load(f))
    with open(out / "baseline" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    for key in ("gold", "refusal_rate", "length", "kl_ref_k1_sum", "ratio_above", "clipfrac"):
        assert key in first
    printed = capsys.readouterr().out
    assert "proxy reward gain" in printed and "refusal rate on UNSAFE" in printed


def test_quick_is_deterministic(tmp_path):
    from rlhf_fast.casestudy.pipeline import quick_config, run_case_study
    from rlhf_fast.casestudy.report import summary_dict

    runs = []
    for i in range(2):
        result = run_case_study(quick_config(seed=1), str(tmp_path / f"run{i}"), progress=False)
        summary = summary_dict(result)
        for run in ("baseline", "fix"):
            summary[run].pop("seconds")
        runs.append(summary)
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- the bar (default run)
@pytest.mark.slow
def test_default_case_study_meets_the_bar(tmp_path):
    from rlhf_fast.casestudy.pipeline import CaseStudyConfig, run_case_study
    from rlhf_fast.casestudy.report import bar_checks, write_report

    out = str(tmp_path / "casestudy")
    result = run_case_study(CaseStudyConfig(), out, progress=False)
    summary = write_report(result, out)
    for name in EXPECTED_FILES:
        assert os.path.isfile(os.path.join(out, name)), name
    _check_summary(summary)
    failed = [f"{c.item}: {c.detail}" for c in bar_checks(summary, result.baseline.records) if not c.ok]
    assert not failed, "\n".join(failed)
    assert result.seconds < 600
