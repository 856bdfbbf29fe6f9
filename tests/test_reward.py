"""Reward model: last-token indexing, Bradley–Terry loss, training on a synthetic preference,
calibration and save/load. Tiny GPT-2 / Llama built from configs (no downloads)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf_fast.training.reward import (  # noqa: E402
    RewardModel,
    RewardTrainConfig,
    bradley_terry_loss,
    calibrate,
    last_token_index,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)

VOCAB, PAD = 16, 0


def tiny_backbone(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_layer=2, n_embd=32, n_head=2, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=1,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return transformers.GPT2Model(config)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(config)  # a backbone with an LM head works too


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 2, 0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_read_at_last_token_with_left_and_right_padding(arch):
    model = RewardModel(tiny_backbone(arch)).eval()
    seqs = [[5, 6, 7], [3, 9, 4, 11, 2]]
    right = torch.full((2, 6), PAD)
    left = torch.full((2, 6), PAD)
    right_mask, left_mask = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, : len(s)] = torch.tensor(s)
        right_mask[i, : len(s)] = 1
        left[i, 6 - len(s) :] = torch.tensor(s)
        left_mask[i, 6 - len(s) :] = 1
    with torch.no_grad():
        unpadded = torch.cat([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        scores_right = model(right, right_mask)
        scores_left = model(left, left_mask)
        # the head really reads the last valid position
        hidden = model.hidden_states(right, right_mask)
        by_hand = model.head(hidden[[0, 1], [2, 4]]).squeeze(-1)
    assert scores_right.shape == (2,)
    torch.testing.assert_close(scores_right, by_hand)
    torch.testing.assert_close(scores_right, unpadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores_left, unpadded, rtol=1e-5, atol=1e-5)
    # a different token at the last position changes the score; one after it (padding) does not
    changed = right.clone()
    changed[0, 3] = 9
    assert torch.allclose(model(changed, right_mask), scores_right, atol=1e-6)


def test_bradley_terry_loss_matches_formula():
    torch.manual_seed(0)
    chosen, rejected, margin = torch.randn(7), torch.randn(7), torch.rand(7)
    c = 0.01
    expected = sum(
        math.log1p(math.exp(-(a - b - m))) for a, b, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())
    ) / 7 + c * sum((a + b) ** 2 for a, b in zip(chosen.tolist(), rejected.tolist())) / 7
    loss = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=c)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    plain = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(chosen.tolist(), rejected.tolist())) / 7
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(plain, rel=1e-5)
    assert float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))) == pytest.approx(math.log(2))


def _preference_pairs(n: int, length: int, seed: int):
    """Random sequences; the preferred one holds more copies of token 3 (ties re-drawn)."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    while len(chosen) < n:
        a = torch.randint(1, VOCAB, (length,), generator=g)
        b = torch.randint(1, VOCAB, (length,), generator=g)
        a[torch.rand(length, generator=g) < 0.3] = 3
        b[torch.rand(length, generator=g) < 0.3] = 3
        ca, cb = int((a == 3).sum()), int((b == 3).sum())
        if ca == cb:
            continue
        chosen.append(a if ca > cb else b)
        rejected.append(b if ca > cb else a)
    ids_c, ids_r = torch.stack(chosen), torch.stack(rejected)
    return ids_c, torch.ones_like(ids_c), ids_r, torch.ones_like(ids_r)


def test_tiny_reward_model_learns_a_synthetic_preference():
    model = RewardModel(tiny_backbone("gpt2"))
    cfg = RewardTrainConfig(lr=5e-3, epochs=4, batch_size=32, seed=0, progress=False)
    result = train_reward_model(model, *_preference_pairs(160, 8, seed=1), cfg, heldout_fraction=0.25)
    assert result["num_heldout"] == 40 and len(result["history"]) == 4
    assert math.isfinite(result["train_loss"])
    assert result["heldout_accuracy"] > 0.8, result
    assert not model.training


def test_calibrate_normalises_to_mean_zero_std_one_and_save_load_round_trips(tmp_path):
    model = RewardModel(tiny_backbone("gpt2")).eval()
    assert not model.is_calibrated
    ids = torch.randint(1, VOCAB, (40, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mean, std = calibrate(model, ids, mask, batch_size=16)
    assert model.is_calibrated
    with torch.no_grad():
        normalised = model.normalize(model(ids, mask))
    assert float(normalised.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(normalised.std()) == pytest.approx(1.0, abs=1e-4)

    save_reward_model(model, str(tmp_path / "rm"))
    loaded = load_reward_model(str(tmp_path / "rm"))
    assert float(loaded.score_mean) == pytest.approx(mean) and float(loaded.score_std) == pytest.approx(std)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))
