"""The ``ppo`` and ``calibrate`` commands: every bad input gives exit code 2 and one ``error:`` line
saying what is wrong and how to fix it (no traceback), files are checked before any model loads,
and ``calibrate`` stores the score mean/std that ``--reward-normalize`` uses."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from rlhf_fast.__main__ import main
from rlhf_fast.training import RewardModel, load_reward_model, sample_replies, save_reward_model
from rlhf_fast.training import cli as ppo_cli
from rlhf_fast.training import cli_calibrate as calibrate_cli
from rlhf_fast.training.cli_calibrate import cycled_prompts
from rlhf_fast.training.seeding import seed_everything

VOCAB, EOS = 32, 1
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18]]


def tiny_gpt2(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_layer=1, n_embd=16, n_head=2,
                                     bos_token_id=EOS, eos_token_id=EOS)
    return transformers.GPT2LMHeadModel(config)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved policy, reward model (uncalibrated), a plain LM directory and a good prompts file."""
    root = tmp_path_factory.mktemp("saved")
    tiny_gpt2(0).save_pretrained(root / "policy")
    save_reward_model(RewardModel(tiny_gpt2(1).base_model), str(root / "rm"))
    tiny_gpt2(2).save_pretrained(root / "plain_lm")
    write_lines(root / "prompts.jsonl", [json.dumps(p) for p in PROMPTS])
    return root


def ppo_args(saved, out, **changes):
    values = {"--policy": saved / "policy", "--reward-model": saved / "rm", "--prompts": saved / "prompts.jsonl",
              "--steps": 1, "--batch": 2, "--samples-per-prompt": 2, "--minibatch-size": 2, "--max-new-tokens": 3,
              "--loss-backend": "eager", "--advantage-estimator": "rloo", "--out-dir": out / "run"}
    values.update(changes)
    args = ["ppo", "--no-progress"]
    for flag, value in values.items():
        if value is not None:
            args += [flag, str(value)]
    return args


def error_of(argv, capsys, command="ppo", only_output=True):
    """Run the command; it must exit with code 2 and end with one error line (returned).

    only_output: the error line is all it printed (no model loaded, so no progress bars either).
    """
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith(f"python -m rlhf_fast {command}: error: "), captured.err
    assert sum("error:" in line for line in lines) == 1 and "Traceback" not in captured.err
    if only_output:
        assert len(lines) == 1 and not captured.out, captured
    return lines[-1]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model is loaded: the file checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module in (ppo_cli, calibrate_cli):
        monkeypatch.setattr(module, "load_causal_lm", refuse)
        monkeypatch.setattr(module, "load_reward", refuse)


# ----------------------------------------------------------------------------- ppo: one test per input problem


def test_missing_policy_directory(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--policy": tmp_path / "no_such_policy"}), capsys)
    assert "--policy" in line and "no_such_policy: no such directory" in line
    assert "save_pretrained" in line


def test_plain_lm_as_reward_model(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--reward-model": saved / "plain_lm"}), capsys)
    assert "is a plain transformers model directory, not a saved reward model (no reward_model.json)" in line
    assert "rf.train_reward_model" in line and "rf.save_reward_model" in line


def test_reward_model_as_policy(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--policy": saved / "rm"}), capsys)
    assert "is a saved reward model, not a causal LM" in line


def test_prompt_line_without_input_ids(saved, tmp_path, capsys, no_model_loads):
    prompts = write_lines(tmp_path / "p.jsonl", ["[5, 6]", '{"text": "hello"}', "[7, 8]"])
    line = error_of(ppo_args(saved, tmp_path, **{"--prompts": prompts}), capsys)
    assert 'line 2: the object has no "input_ids"' in line and "must be tokenized first" in line


def test_out_of_vocabulary_prompt_id(saved, tmp_path, capsys, no_model_loads):
    prompts = write_lines(tmp_path / "p.jsonl", ["[5, 6]", '{"input_ids": [7, 8]}', f"[9, {VOCAB}]"])
    line = error_of(ppo_args(saved, tmp_path, **{"--prompts": prompts}), capsys)
    assert f"line 3: token id {VOCAB} is outside the policy's vocabulary [0, {VOCAB})" in line
    assert "tokenizer" in line


def test_malformed_json_line(saved, tmp_path, capsys, no_model_loads):
    prompts = write_lines(tmp_path / "p.jsonl", ["[5, 6]", "", "[7, 8,", "[9]"])
    line = error_of(ppo_args(saved, tmp_path, **{"--prompts": prompts}), capsys)
    assert "p.jsonl line 3: not valid JSON" in line


@pytest.mark.parametrize("content, message", [
    (['["a", "b"]'], "line 1: token ids must be integers, got 'a'"),
    (["[[5, 6], [7, 8]]"], "line 1: a list of lists (a batch)"),
    (["[5]", "[]"], "line 2: an empty prompt"),
    (["[5]", '"hello"'], "line 2: a JSON str, not a prompt"),
    (["", "  "], "holds no prompts"),
])
def test_other_prompt_problems(saved, tmp_path, capsys, no_model_loads, content, message):
    prompts = write_lines(tmp_path / "p.jsonl", content)
    assert message in error_of(ppo_args(saved, tmp_path, **{"--prompts": prompts}), capsys)


def test_missing_prompts_file(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--prompts": tmp_path / "none.jsonl"}), capsys)
    assert "none.jsonl: no such file" in line and "JSONL" in line


def test_fewer_prompts_than_batch(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--batch": 6, "--minibatch-size": 4}), capsys)
    assert "holds 5 prompts but --batch is 6" in line and "lower --batch to at most 5" in line


def test_reward_normalize_needs_calibration(saved, tmp_path, capsys, no_model_loads):
    argv = ppo_args(saved, tmp_path) + ["--reward-normalize"]
    line = error_of(argv, capsys)
    assert "is not calibrated" in line and "python -m rlhf_fast calibrate --reward-model" in line


def test_bad_option_names_its_flag(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--dual-clip": 0.5, "--steps": 0}), capsys)
    assert "--dual-clip must be a finite number > 1" in line and "--steps must be an integer >= 1" in line


def test_bad_special_token(saved, tmp_path, capsys, no_model_loads):
    line = error_of(ppo_args(saved, tmp_path, **{"--eos-token-id": VOCAB}), capsys)
    assert f"--eos-token-id = {VOCAB} is not a token id of the policy's vocabulary [0, {VOCAB})" in line


def test_incompatible_models_after_loading(saved, tmp_path, capsys):
    """A reward model with a smaller vocabulary: found once the models load, still one error line."""
    torch.manual_seed(0)
    small = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB - 4, n_positions=64, n_layer=1,
                                                           n_embd=16, n_head=2))
    save_reward_model(RewardModel(small), str(tmp_path / "small_rm"))
    line = error_of(ppo_args(saved, tmp_path, **{"--reward-model": tmp_path / "small_rm"}), capsys,
                    only_output=False)
    assert "reward model's vocabulary (28) is smaller than the policy's (32)" in line


def test_exit_code_and_message_from_a_fresh_process(saved, tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlhf_fast", *map(str, ppo_args(saved, tmp_path, **{
        "--policy": tmp_path / "missing"}))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m rlhf_fast ppo: error: --policy {tmp_path / 'missing'}: no such directory; pass a directory "
        "written by model.save_pretrained(DIR) (a local directory, not a Hub id)"]


# ----------------------------------------------------------------------------- calibrate


def calibrate_args(rm, saved, *extra):
    return ["calibrate", "--reward-model", rm, "--policy", saved / "policy", "--prompts", saved / "prompts.jsonl",
            "--samples", 12, "--max-new-tokens", 4, "--temperature", 0.9, "--seed", 3, "--batch-size", 5, *extra]


def test_calibrate_end_to_end(saved, tmp_path, capsys):
    rm = tmp_path / "rm"
    shutil.copytree(saved / "rm", rm)
    assert not load_reward_model(str(rm)).is_calibrated
    assert main([str(a) for a in calibrate_args(rm, saved)]) == 0
    out = capsys.readouterr().out
    calibrated = load_reward_model(str(rm))
    assert calibrated.is_calibrated
    mean, std = float(calibrated.score_mean), float(calibrated.score_std)
    assert f"mean {mean:.6g}, std {std:.6g}" in out
    assert json.loads((rm / "reward_model.json").read_text())["score_mean"] == pytest.approx(mean)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging directory left behind

    # the same replies again (same seed, same prompt order): normalised scores have mean 0 and std 1
    policy = transformers.AutoModelForCausalLM.from_pretrained(saved / "policy", use_kernels=False).eval()
    seed_everything(3)
    samples = sample_replies(policy, cycled_prompts(PROMPTS, 12, 3), max_new_tokens=4, temperature=0.9,
                             eos_token_id=EOS, pad_token_id=EOS, batch_size=5)
    with torch.no_grad():
        normalised = calibrated.normalize(calibrated(samples.input_ids, samples.attention_mask))
    assert float(normalised.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(normalised.std()) == pytest.approx(1.0, abs=1e-4)

    # and --reward-normalize now runs
    argv = ppo_args(saved, tmp_path, **{"--reward-model": rm}) + ["--reward-normalize"]
    assert main([str(a) for a in argv]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(last["score_norm_mean"])


def test_calibrate_to_another_directory_keeps_the_original(saved, tmp_path, capsys):
    rm = tmp_path / "rm"
    shutil.copytree(saved / "rm", rm)
    (rm / "tokenizer_note.txt").write_text("kept")
    before = {n: (rm / n).read_bytes() for n in os.listdir(rm)}
    assert main([str(a) for a in calibrate_args(rm, saved, "--out", tmp_path / "calibrated")]) == 0
    assert "saved the calibrated reward model to" in capsys.readouterr().out
    assert {n: (rm / n).read_bytes() for n in os.listdir(rm)} == before
    assert load_reward_model(str(tmp_path / "calibrated")).is_calibrated
    assert (tmp_path / "calibrated" / "tokenizer_note.txt").read_text() == "kept"


@pytest.mark.parametrize("change, message", [
    ({"--prompts": "missing.jsonl"}, "missing.jsonl: no such file"),
    ({"--samples": 1}, "--samples must be at least 2"),
    ({"--temperature": 0}, "--temperature must be a finite number > 0"),
    ({"--reward-model": "plain_lm"}, "not a saved reward model"),
])
def test_calibrate_checks_its_inputs(saved, tmp_path, capsys, no_model_loads, change, message):
    argv = [str(a) for a in calibrate_args(saved / "rm", saved)]
    for flag, value in change.items():
        value = str(saved / value) if flag in ("--prompts", "--reward-model") else str(value)
        argv[argv.index(flag) + 1] = value
    assert message in error_of(argv, capsys, command="calibrate")
    assert not load_reward_model(str(saved / "rm")).is_calibrated
