"""The integrations with Hugging Face models, TRL and verl, on tiny models built from a config (no downloads).

* transformers: the hidden states and LM head (tied, untied, with a bias) and the logit
  transforms of real model classes (Gemma 2's soft-cap, Cohere's logit_scale, Granite's
  logits_scaling): the fused-linear loss and log-probs equal the eager loss on the model's own
  logits, gradients to every parameter included; unknown post-processing raises.
* TRL: the same ``GRPOTrainer`` run (tiny Llama, 8 prompts' worth of completions, a rule-based
  reward, 2 optimizer steps of 2 accumulated micro-batches, 2 iterations per generation so the
  second step is off-policy and clips, fixed seed, fp32) with TRL's own loss and with
  ``RLHFFastGRPOTrainer`` / ``equip``: step 1's loss, every parameter gradient and TRL's loss
  metrics agree to the contract's fp32 tolerances (rtol 1e-5, atol 1e-6); step 2 starts from
  parameters that differ by step 1's rounding and is held to rtol 1e-4, atol 1e-5. For each
  loss_type and importance-sampling level, the entropy bonus (static and adaptive), the four
  vLLM importance-sampling modes (the vLLM sampling log-probs simulated) and a soft-capped model.
* verl: the patched forward against verl's own torch-backend fused forward and a plain
  ``log_softmax`` of the model's logits, on padded and remove-padding (``[1, total_nnz]``) input.

trl and verl are imported unconditionally: CI installs both, and a missing one fails here.
"""

from __future__ import annotations

import ast
import copy
import logging
import pathlib
import re
import warnings

import datasets
import pytest
import torch
import transformers
import trl
from helpers import CHARS, TOLERANCES, assert_double_baseline, char_tokenizer

import rlhf_fast as rf
from rlhf_fast.integrations import transformers as rft
from rlhf_fast.integrations import trl as rf_trl
from rlhf_fast.integrations import trl_loss, trl_shim
from rlhf_fast.integrations import verl as rf_verl
from rlhf_fast.integrations.transformers import UnsupportedModelError
from rlhf_fast.loss.policy import POLICY_LOSSES

FP32 = TOLERANCES[torch.float32]
LATER_STEP = dict(rtol=1e-4, atol=1e-5)  # step 2 starts from parameters that differ by step 1's rounding

SMALL = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    m = transformers
    if kind == "llama":
        return m.LlamaForCausalLM(m.LlamaConfig(**SMALL))
    if kind == "llama-tied":
        return m.LlamaForCausalLM(m.LlamaConfig(**SMALL, tie_word_embeddings=True))
    if kind == "gemma2":  # tanh soft-cap of the logits
        return m.Gemma2ForCausalLM(m.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0))
    if kind == "cohere":  # logits × logit_scale
        return m.CohereForCausalLM(m.CohereConfig(**SMALL, logit_scale=0.3, bos_token_id=1, eos_token_id=2,
                                                  pad_token_id=0))
    if kind == "granite":  # logits / logits_scaling
        return m.GraniteForCausalLM(m.GraniteConfig(**SMALL, logits_scaling=0.5))
    if kind == "phi":  # an LM head with a bias
        return m.PhiForCausalLM(m.PhiConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=64))
    raise ValueError(kind)


def check_parameter_gradients(got_grads, want_grads, truth_grads, what):
    """A model's parameter gradients, fused path against eager, with an fp64 copy of the model as the truth.

    They flow back through the whole model (attention, norms), where the two paths sum in
    different orders and cancellation on small entries amplifies it: like the matmul-reduced
    gradients elsewhere, they are held to the contract's double baseline (error against fp64 at
    most 2x eager's own + 1e-6), while per-token outputs keep the fp32 tolerance.
    """
    assert set(got_grads) == set(want_grads) == set(truth_grads)
    for name in want_grads:
        assert_double_baseline({name: got_grads[name]}, {name: want_grads[name]}, {name: truth_grads[name]},
                               f"{what} d{name}:")


# ----------------------------------------------------------------------------------
# transformers: hidden states, LM head, logit transforms
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "phi", "gemma2", "cohere", "granite"])
def test_fused_linear_equals_eager_on_the_models_own_logits(kind):
    model = _model(kind)
    head = rft.lm_head(model)
    expected = {"gemma2": (None, 2.0), "cohere": (0.3, None), "granite": (2.0, None)}.get(kind, (None, None))
    assert (head.logit_scale, head.logit_softcap) == expected
    assert (head.bias is not None) == (kind == "phi")
    if kind == "llama-tied":
        assert head.weight is model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, 10), generator=gen)
    targets = torch.roll(ids, -1, dims=-1)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False
    advantages = torch.randn(3, generator=gen)
    with torch.no_grad():  # a larger head: logits of a few units (Gemma 2's cap saturates on some)
        model.get_output_embeddings().weight.mul_(20.0 if kind == "gemma2" else 6.0)
        logits = model(input_ids=ids).logits
        lp0 = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = lp0 + 0.2 * torch.randn(lp0.shape, generator=gen)
    if kind == "gemma2":
        assert logits.abs().max() > 1.9  # close to the cap c = 2: the tanh is far from linear here
    options = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.9, loss_agg="seq-mean-token-mean")
    model64 = copy.deepcopy(model).double()  # the truth for the parameters' gradients

    def grads(m=model):
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return g

    def eager_loss(m, dtype):
        return rf.ppo_loss(m(input_ids=ids).logits, targets, advantages.to(dtype), old.to(dtype), lp0.to(dtype), mask,
                           backend="eager", **options)

    want = eager_loss(model, torch.float32)
    want.loss.backward()
    want_grads = grads()
    eager_loss(model64, torch.float64).loss.backward()
    truth_grads = grads(model64)
    hidden = rft.hidden_states(model, input_ids=ids)
    head = rft.lm_head(model, verify=False)
    got = rf.fused_linear_ppo_loss(hidden, head.weight, targets, advantages, old, lp0, mask, chunk_size=8,
                                   **head.loss_kwargs(), **options)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, **FP32)
    torch.testing.assert_close(got.logprobs, want.logprobs, **FP32)
    torch.testing.assert_close(got.entropy, want.entropy, **FP32)
    check_parameter_gradients(grads(), want_grads, truth_grads, f"{kind} ppo_loss")
    # differentiable log-probs and entropy from the same head

    def eager_logprobs(m):
        lp, ent = rf.logprobs(m(input_ids=ids).logits, targets, mask, with_entropy=True, backend="eager")
        (lp.sum() - 0.5 * ent.sum()).backward()
        return lp, ent

    lp, ent = eager_logprobs(model)
    want_grads = grads()
    eager_logprobs(model64)
    truth_grads = grads(model64)
    lp2, ent2 = rf.fused_linear_logprobs(rft.hidden_states(model, input_ids=ids), head.weight, targets, mask,
                                         with_entropy=True, chunk_size=8, **head.loss_kwargs())
    (lp2.sum() - 0.5 * ent2.sum()).backward()
    torch.testing.assert_close(lp2, lp, **FP32)
    torch.testing.assert_close(ent2, ent, **FP32)
    check_parameter_gradients(grads(), want_grads, truth_grads, f"{kind} logprobs")


class _DoubledLogits(transformers.LlamaForCausalLM):
    """A model class whose forward post-processes the logits (an unknown transform)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


class _ScaledHidden(transformers.LlamaForCausalLM):
    """A model class that scales the hidden states between the backbone and the head."""

    def forward(self, input_ids=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(hidden * 0.5))


class _NoHeadCall(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=hidden @ self.lm_head.weight.T)


class _CustomHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.parametrize("case", ["doubled", "scaled-hidden", "no-head-call", "custom-head", "wrong-config",
                                  "bad-config-value"])
def test_unknown_output_processing_raises(case):
    config = transformers.LlamaConfig(**SMALL)
    if case == "doubled":
        model, match = _DoubledLogits(config), "does not reproduce"
    elif case == "scaled-hidden":
        model, match = _ScaledHidden(config), "not its backbone's last hidden state"
    elif case == "no-head-call":
        model, match = _NoHeadCall(config), "never calls its output embedding"
    elif case == "custom-head":
        model, match = transformers.LlamaForCausalLM(config), "not a plain"
        model.lm_head = _CustomHead(16, 61, bias=False)
    elif case == "wrong-config":  # the config claims a scale the forward does not apply
        model, match = _model("llama"), "does not reproduce"
        model.config.logit_scale = 0.5
    else:
        model, match = _model("gemma2"), "final_logit_softcapping"
        model.config.final_logit_softcapping = -1.0
    with pytest.raises(UnsupportedModelError, match=match):
        rft.lm_head(model)


def test_probe_restores_the_training_mode_and_leaves_no_hooks():
    model = _model("gemma2")
    model.train()
    rft.lm_head(model)
    assert model.training
    head = model.get_output_embeddings()
    assert not head._forward_hooks and not head._forward_pre_hooks


# ----------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Saved tiny policies (TRL builds its reference model from the policy's path)."""
    paths = {}
    tokenizer = char_tokenizer()
    common = dict(vocab_size=len(CHARS) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=1)
    for kind, model in {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)),
        "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=8,
                                                                                   final_logit_softcapping=1.5)),
    }.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model().save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[kind] = str(path)
    return paths


def _reward(completions, **_):
    return [float(c.count("a")) - 0.3 * len(c) for c in completions]


class _Gradients(transformers.TrainerCallback):
    """Every parameter's gradient just before each optimizer step (clipping is off)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _fake_vllm(trainer, nan: bool = False):
    """Simulate vLLM sampling: TRL's generation, with sampling log-probs = the policy's own plus noise.

    ``nan``: the second token of every completion has no sampling log-prob (NaN), as when vLLM cannot score it.
    """
    generate = trainer._generate
    noise = torch.Generator().manual_seed(1)

    def _generate(prompts):
        trainer.use_vllm = False
        try:
            out = generate(prompts)
        finally:
            trainer.use_vllm = True
        logprobs = []
        with torch.no_grad():
            for prompt, completion in zip(out[0], out[1], strict=True):
                ids = torch.tensor([list(prompt) + list(completion)])
                logits = trainer.model(input_ids=ids).logits[0, len(prompt) - 1:-1]
                lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
                lp = lp + 0.3 * torch.randn(lp.shape, generator=noise)
                if nan and lp.numel() > 1:
                    lp[1] = float("nan")
                logprobs.append(lp.tolist())
        return out[:4] + (logprobs,) + out[5:]

    trainer._generate = _generate
    trainer.use_vllm = True


LOSS_METRICS = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "policy_loss", "entropy_coef")


def _grpo_run(path, tmp_path, ours: bool, vllm: bool = False, nan: bool = False, lengths=None, **config):
    """Two optimizer steps; returns (log history per step, gradients per step).

    ``lengths``: a list that gets each micro-batch's completion lengths (the loss mask's row sums).
    """
    args = dict(output_dir=str(tmp_path / ("ours" if ours else "trl")), per_device_train_batch_size=4,
                num_generations=4, gradient_accumulation_steps=2, max_completion_length=8, max_steps=2,
                num_iterations=2, learning_rate=2.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                beta=0.05, bf16=False, logging_steps=1, report_to=[], seed=0, use_cpu=True, save_strategy="no")
    args.update(config)
    grads = _Gradients()
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            trainer = trl.GRPOTrainer(model=path, reward_funcs=_reward, args=trl.GRPOConfig(**args),
                                      train_dataset=dataset, processing_class=char_tokenizer(), callbacks=[grads])
            if vllm:
                _fake_vllm(trainer, nan)
            if ours:
                rf_trl.equip(trainer)
            if lengths is not None:
                compute_loss = trainer._compute_loss

                def recording(model, inputs):
                    lengths.append(inputs["completion_mask"].sum(-1).tolist())
                    return compute_loss(model, inputs)

                trainer._compute_loss = recording
            trainer.train()
        finally:
            logging.disable(logging.NOTSET)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 2 and len(grads.steps) == 2
    return logs, grads.steps


def _assert_same_run(trl_run, our_run, what):
    (trl_logs, trl_grads), (our_logs, our_grads) = trl_run, our_run
    for step, tol in ((0, FP32), (1, LATER_STEP)):
        want, got = trl_logs[step], our_logs[step]
        for key in LOSS_METRICS:
            assert (key in want) == (key in got), f"{what} step {step + 1}: metric {key} logged by only one run"
            if key in want:
                torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), **tol,
                                           msg=lambda m, k=key, s=step: f"{what} step {s + 1} {k}: {m}")
        assert set(our_grads[step]) == set(trl_grads[step])
        for name, g in trl_grads[step].items():
            torch.testing.assert_close(our_grads[step][name], g, **tol,
                                       msg=lambda m, n=name, s=step: f"{what} step {s + 1} d{n}: {m}")
    return trl_logs


TRL_CASES = [(loss, level) for loss in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") for level in ("token", "sequence")]
TRL_CASES += [("cispo", "token"), ("sapo", "token")]


@pytest.mark.parametrize("loss_type, level", TRL_CASES)
def test_trl_grpo_run_matches_trls_own_loss(tiny_models, tmp_path, loss_type, level):
    config = dict(loss_type=loss_type, importance_sampling_level=level)
    if loss_type == "cispo":
        config["epsilon_high"] = 1.5
    if level == "sequence":
        config["use_bias_correction_kl"] = False
    else:
        config["epsilon_high"] = config.get("epsilon_high", 0.28)  # asymmetric clip
    if loss_type == "grpo" and level == "token":
        config["delta"] = 1.6  # two-sided clipping above the clip range (the dual clip)
    if loss_type == "bnpo" and level == "token":
        config["delta"] = 1.1  # two-sided clipping inside the clip range (caps A > 0 at delta)
    trl_run = _grpo_run(tiny_models["llama"], tmp_path, False, **config)
    logs = _assert_same_run(trl_run, _grpo_run(tiny_models["llama"], tmp_path, True, **config),
                            f"{loss_type}/{level}")
    if loss_type != "sapo":  # the second step is off-policy and clips: the clip branches are exercised
        clipped = logs[1].get("clip_ratio/region_mean", logs[1].get("cispo_clip_ratio"))
        assert clipped > 0, f"{loss_type}/{level}: nothing clipped in step 2"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
def test_trl_mapping_with_more_generation_steps_than_accumulation_and_empty_completions(tiny_models, tmp_path,
                                                                                        loss_type):
    """The shipped option mapping where TRL's defaults hide its normalisers: steps_per_generation (4) ≠
    gradient_accumulation_steps (2), so num_items_in_batch spans two optimizer steps (dapo, cispo rescale it
    by accumulation / steps_per_generation), and mask_truncated_completions=True with completions cut at 3
    tokens, so some rows of a micro-batch have no token (grpo, sapo, luspo average over all rows: the
    B_valid / B factor)."""
    config = dict(loss_type=loss_type, steps_per_generation=4, gradient_accumulation_steps=2,
                  mask_truncated_completions=True, max_completion_length=3, num_iterations=1)
    if loss_type == "cispo":
        config["epsilon_high"] = 1.5
    trl_lengths, our_lengths = [], []
    trl_run = _grpo_run(tiny_models["llama"], tmp_path, False, lengths=trl_lengths, **config)
    _assert_same_run(trl_run, _grpo_run(tiny_models["llama"], tmp_path, True, lengths=our_lengths, **config),
                     f"{loss_type} with steps_per_generation=4 and truncated completions masked")
    assert our_lengths == trl_lengths and len(trl_lengths) == 4  # 4 micro-batches from one generation
    # what the test is for: micro-batches that mix empty and non-empty completions, and token counts that differ
    # between micro-batches (so a normaliser over the wrong window shows)
    assert any(0 in rows and max(rows) > 0 for rows in trl_lengths), trl_lengths
    assert len({sum(rows) for rows in trl_lengths}) > 1, trl_lengths


@pytest.mark.parametrize("loss_type, adaptive", [(name, False) for name in rf_trl.LOSS_TYPES] + [("grpo", True)])
def test_trl_entropy_bonus(tiny_models, tmp_path, loss_type, adaptive):
    """Every record's bonus: in the loss (bnpo) or added to it as TRL adds it (the others)."""
    config = dict(loss_type=loss_type, entropy_coef=0.05)
    if loss_type == "cispo":
        config["epsilon_high"] = 1.5
    if adaptive:
        config.update(use_adaptive_entropy=True, entropy_target=10.0)
    logs = _assert_same_run(_grpo_run(tiny_models["llama"], tmp_path, False, **config),
                            _grpo_run(tiny_models["llama"], tmp_path, True, **config), f"entropy {loss_type}")
    assert "policy_loss" in logs[0] and "entropy_coef" in logs[0]
    if adaptive:
        assert logs[1]["entropy_coef"] != 0.05  # the controller moved the coefficient


@pytest.mark.parametrize("mode, level, nan", [("token_truncate", "token", False), ("token_mask", "token", True),
                                             ("sequence_truncate", "token", False), ("sequence_mask", "token", False),
                                             ("sequence_mask", "sequence", True)])
def test_trl_vllm_importance_sampling(tiny_models, tmp_path, mode, level, nan):
    config = dict(loss_type="grpo" if mode.startswith("token") else "dapo", vllm_importance_sampling_mode=mode,
                  vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=1.5,
                  importance_sampling_level=level, use_bias_correction_kl=level == "token")
    _assert_same_run(_grpo_run(tiny_models["llama"], tmp_path, False, vllm=True, nan=nan, **config),
                     _grpo_run(tiny_models["llama"], tmp_path, True, vllm=True, nan=nan, **config),
                     f"vLLM IS {mode}/{level}")


def test_trl_soft_capped_model(tiny_models, tmp_path):
    """A Gemma-2-style policy: TRL's own fused head and ours both apply the soft-cap."""
    _assert_same_run(_grpo_run(tiny_models["gemma2"], tmp_path, False, loss_type="dapo"),
                     _grpo_run(tiny_models["gemma2"], tmp_path, True, loss_type="dapo"), "gemma2")


def test_trl_lm_head_in_fp32_under_bf16_autocast(tiny_models, tmp_path):
    """cast_lm_head_to_fp32 under bf16 autocast: the backbone in autocast, both heads in fp32."""
    config = dict(loss_type="dapo", bf16=True, cast_lm_head_to_fp32=True)
    _assert_same_run(_grpo_run(tiny_models["llama"], tmp_path, False, **config),
                     _grpo_run(tiny_models["llama"], tmp_path, True, **config), "cast_lm_head_to_fp32")


UNSUPPORTED = {
    "vespo": dict(loss_type="vespo"),
    "top_entropy_quantile": dict(top_entropy_quantile=0.5),
    "off_policy_mask_threshold": dict(off_policy_mask_threshold=0.5),
    "sequence": dict(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence"),
    "use_bias_correction_kl": dict(importance_sampling_level="sequence", beta=0.1),
    "delta": dict(delta=0.9),
    "epsilon_high > 1": dict(loss_type="cispo", epsilon_high=0.5),
}


def test_trl_token_level_vllm_weights_with_sequence_level_ratio_raise(tiny_models, tmp_path):
    config = dict(importance_sampling_level="sequence", use_bias_correction_kl=False,
                  vllm_importance_sampling_mode="token_truncate")
    with pytest.raises(ValueError, match="use a sequence_\\* mode"):
        _grpo_run(tiny_models["llama"], tmp_path, True, vllm=True, **config)


@pytest.mark.parametrize("mode, high", [("sequence_mask", None), ("sequence_truncate", 1e9)])
def test_trl_sequence_level_vllm_weights_without_a_bound_below_e20_raise(tiny_models, tmp_path, mode, high):
    """TRL's sequence weight e^Σ has no cap, ours caps Σ at 20 (test_peer_parity shows both sides)."""
    config = dict(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5,
                  vllm_importance_sampling_clip_max=high)
    with pytest.raises(ValueError, match=r"set vllm_importance_sampling_clip_max below 4\.8e\+08"):
        _grpo_run(tiny_models["llama"], tmp_path, True, vllm=True, **config)


def _small_args(tmp_path, **config) -> trl.GRPOConfig:
    return trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to=[],
                          use_cpu=True, bf16=False, **config)


def _small_trainer(model, args, trainer_class=trl.GRPOTrainer):
    """A trainer on two prompts, for what happens at construction and at ``equip``."""
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "cd"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_class(model=model, reward_funcs=_reward, args=args, train_dataset=dataset,
                             processing_class=char_tokenizer())


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_trl_unsupported_options_raise_at_construction(tiny_models, tmp_path, name):
    args = _small_args(tmp_path, **UNSUPPORTED[name])
    with pytest.raises(ValueError, match=name.split(" ")[0]):
        _small_trainer(tiny_models["llama"], args, rf_trl.RLHFFastGRPOTrainer)


def test_trl_model_with_unknown_logit_processing_raises(tiny_models, tmp_path):
    model = _DoubledLogits.from_pretrained(tiny_models["llama"], use_kernels=False)
    trainer = _small_trainer(model, _small_args(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="cannot score this model"):
            rf_trl.equip(trainer)
    with pytest.raises(ValueError, match="GRPOTrainer"):
        rf_trl.equip(object())


def test_trl_shim_checks_the_trl_version_and_the_method_it_replaces(tiny_models, tmp_path, monkeypatch):
    """The shim is written for one TRL release: another warns (naming both), a trainer without the
    ``_compute_loss`` it replaces raises."""
    trainer = _small_trainer(tiny_models["llama"], _small_args(tmp_path))
    assert trl.__version__ == trl_shim.WRITTEN_FOR  # the [trl] extra pins the release the shim reads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rf_trl.equip(trainer)
    assert not [w for w in caught if "written and tested for TRL" in str(w.message)]
    monkeypatch.setattr(trl, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match=r"written and tested for TRL 1\.16\.0, and TRL 9\.0\.0 is installed"):
        rf_trl.equip(trainer)
    assert isinstance(trainer._rlhf_fast, trl_loss.Setup)  # still equipped: a warning, not a refusal
    trainer._compute_loss = None
    with pytest.raises(RuntimeError, match=r"no _compute_loss\(model, inputs\).*written for TRL 1\.16\.0"):
        rf_trl.equip(trainer)


def test_trl_table_has_a_record_or_a_refusal_for_every_trl_loss_type():
    """LOSS_TYPES and REFUSED_LOSS_TYPES together are exactly the loss types TRL's GRPOConfig lists."""
    help_text = trl.GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = re.search(r"Supported values are (.*?)\. ", help_text)
    assert listed, help_text[:200]
    assert set(re.findall(r"'(\w+)'", listed.group(1))) == set(rf_trl.LOSS_TYPES) | set(rf_trl.REFUSED_LOSS_TYPES)
    assert not set(rf_trl.LOSS_TYPES) & set(rf_trl.REFUSED_LOSS_TYPES)


def test_trl_records_name_registered_policy_losses_with_the_properties_they_rely_on(tmp_path):
    """A record's token-level policy loss reads no sequence, its sequence-level one does (the registry's
    needs_sequences), a mapping that sets a dual clip names variants that take one, and every
    aggregation is the loss's."""
    args = _small_args(tmp_path, delta=1.5, epsilon_high=2.0)
    for name, record in rf_trl.LOSS_TYPES.items():
        mapping = record.policy
        variants = [POLICY_LOSSES.get(mapping.token)]
        assert not variants[0].needs_sequences, name
        if mapping.sequence is not None:
            variants.append(POLICY_LOSSES.get(mapping.sequence))
            assert variants[1].needs_sequences, name
        if mapping.options(args).get("dual_clip") is not None:
            assert all(v.takes_dual_clip for v in variants), name
        assert record.aggregation in rf.LOSS_AGGREGATIONS, name


def test_only_the_trl_shim_reads_trls_internals():
    """TRL's trainer attributes, micro-batch keys and helper module are named in trl_shim.py and nowhere else in
    the adapter (a MicroBatch field may share a key's name: it is read as an attribute, not a key)."""
    attributes = {"_compute_loss", "_metrics", "_entropy_bonus_enabled", "_last_world_entropy", "_entropy_window_stats",
                  "entropy_coef", "use_adaptive_entropy", "current_gradient_accumulation_steps", "aux_loss_enabled",
                  "use_vllm", "maybe_gather_lm_head_ctx"}
    keys = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask", "advantages",
            "old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "num_items_in_batch",
            "trl.trainer.utils"}
    folder = pathlib.Path(rf_trl.__file__).parent
    shim_text = (folder / "trl_shim.py").read_text()
    assert not [name for name in attributes | keys if name not in shim_text]
    for module in ("trl.py", "trl_loss.py"):
        tree = ast.parse((folder / module).read_text())
        named = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                 and not (isinstance(n.value, ast.Name) and n.value.id == "shim")} & attributes  # not the shim's API
        named |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in keys}
        named |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module in keys}
        assert not named, (module, sorted(named))


# ----------------------------------------------------------------------------------
# verl
# ----------------------------------------------------------------------------------


def _verl_inputs(packed: bool):
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 4, 9]
    if packed:  # remove-padding: the sequences side by side in one row, positions restarting
        ids = torch.randint(0, 61, (1, sum(lengths)), generator=gen)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        return dict(input_ids=ids, attention_mask=None, position_ids=position_ids)
    ids = torch.randint(0, 61, (3, max(lengths)), generator=gen)
    attention_mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):  # left padding, as verl's batches
        attention_mask[row, max(lengths) - n:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids)


def _verl_call(model, forward, inputs, temperature, **extra):
    """(log_probs, entropy, parameter gradients) of one fused forward and a loss written on its outputs."""
    model.zero_grad(set_to_none=True)
    out = forward(model, **inputs, temperature=temperature, return_dict=True, use_cache=False, **extra)
    weights = torch.linspace(-1.0, 1.0, out.log_probs.shape[-1])
    ((out.log_probs * weights).sum() + 0.3 * (out.entropy * weights.flip(0)).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_forward(model, *, temperature, shift_labels=None, input_ids=None, **inputs):
    """log_softmax of the model's own logits: the truth for both fused forwards."""
    inputs.pop("return_dict", None)
    logits = model(input_ids=input_ids, **inputs).logits
    logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
    targets = shift_labels if shift_labels is not None else torch.roll(input_ids, -1, dims=-1)
    log_p = torch.log_softmax(logits, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return type("Out", (), {"log_probs": log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), "entropy": entropy})


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "remove-padding"])
def test_verl_forward_matches_verls_torch_backend_and_log_softmax(packed):
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_with_torch_backend

    model = _model("llama")
    inputs = _verl_inputs(packed)
    ours, our_grads = _verl_call(model, rf_verl.forward, inputs, 0.7)
    _, truth_grads = _verl_call(copy.deepcopy(model).double(), _plain_forward, inputs, 0.7)
    assert isinstance(ours, CausalLMOutputForPPO)
    assert ours.log_probs.shape == inputs["input_ids"].shape == ours.entropy.shape
    for name, forward in (("verl torch backend", forward_with_torch_backend), ("log_softmax", _plain_forward)):
        want, want_grads = _verl_call(model, forward, inputs, 0.7)
        torch.testing.assert_close(ours.log_probs, want.log_probs, **FP32, msg=lambda m, n=name: f"{n} lp: {m}")
        torch.testing.assert_close(ours.entropy, want.entropy, **FP32, msg=lambda m, n=name: f"{n} H: {m}")
        check_parameter_gradients(our_grads, want_grads, truth_grads, f"against {name}")


def test_verl_forward_takes_shift_labels_and_ignores_minus_100():
    model = _model("llama")
    inputs = _verl_inputs(packed=True)
    labels = torch.roll(inputs["input_ids"], -1, dims=-1)
    labels[0, -1] = -100
    out = rf_verl.forward(model, **inputs, shift_labels=labels, temperature=1.0, return_dict=True)
    want = _plain_forward(model, temperature=1.0, shift_labels=labels.clamp(min=0), **inputs)
    torch.testing.assert_close(out.log_probs[0, :-1], want.log_probs[0, :-1], **FP32)
    assert out.log_probs[0, -1] == 0 and out.entropy[0, -1] == 0


def test_verl_forward_applies_the_soft_cap():
    """verl's own backends ignore a soft-cap; ours equals log_softmax of the model's (capped) logits."""
    model = _model("gemma2")
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    # remove-padding inputs: in fp64, transformers 5.25's eager attention gives NaN on left-padded rows
    inputs = _verl_inputs(packed=True)
    ours, our_grads = _verl_call(model, rf_verl.forward, inputs, 1.0)
    want, want_grads = _verl_call(model, _plain_forward, inputs, 1.0)
    _, truth_grads = _verl_call(copy.deepcopy(model).double(), _plain_forward, inputs, 1.0)
    torch.testing.assert_close(ours.log_probs, want.log_probs, **FP32)
    torch.testing.assert_close(ours.entropy, want.entropy, **FP32)
    check_parameter_gradients(our_grads, want_grads, truth_grads, "soft-capped")


def test_verl_backend_name_selects_the_patch():
    from verl.models.transformers import monkey_patch

    rf_verl.install()  # idempotent: importing the module installed it already
    assert getattr(monkey_patch.patch_forward_with_backends, "_rlhf_fast", False)
    model = _model("llama")
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="rlhf_fast")
    assert model.forward.__func__ is rf_verl.forward
    out = model(**_verl_inputs(packed=False), temperature=1.0, return_dict=True)
    assert out.log_probs.dtype == torch.float32
    other = _model("llama")
    monkey_patch.patch_forward_with_backends(other, use_fused_kernels=False, fused_kernels_backend="rlhf_fast")
    assert "forward" not in vars(other)  # use_fused_kernels=False: untouched
    with pytest.raises(ValueError, match="return_dict"):
        rf_verl.forward(model, **_verl_inputs(packed=False), return_dict=False)


def test_verl_torch_backend_dtypes_against_ours():
    """On a bf16 model verl's torch backend returns fp32 log-probs and a bf16 entropy; ours, fp32 for both."""
    from verl.models.transformers.dense_common import forward_with_torch_backend

    model = _model("llama").to(torch.bfloat16)
    inputs = _verl_inputs(packed=True)
    theirs = forward_with_torch_backend(model, **inputs, temperature=1.0, return_dict=True, use_cache=False)
    assert (theirs.log_probs.dtype, theirs.entropy.dtype) == (torch.float32, torch.bfloat16)
    ours = rf_verl.forward(model, **inputs, temperature=1.0, return_dict=True, use_cache=False)
    assert (ours.log_probs.dtype, ours.entropy.dtype) == (torch.float32, torch.float32)


def test_verl_cannot_patch_any_model_with_trl_installed():
    """verl 0.9.1's apply_monkey_patch (run by its FSDP engine on every model, whatever the backend) imports
    AutoModelForCausalLMWithValueHead from trl.experimental.ppo, then from trl; TRL 1.16 has neither."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    model = _model("llama")
    with pytest.raises(ImportError, match="cannot import name 'AutoModelForCausalLMWithValueHead' from 'trl'"):
        apply_monkey_patch(model, use_fused_kernels=False)
    assert "forward" not in vars(model)  # it stopped before patching anything


# ----------------------------------------------------------------------------------
# docs/integrations.md runs as written; `import rlhf_fast` stays lean
# ----------------------------------------------------------------------------------


def test_the_documented_examples_run(tmp_path):
    import subprocess
    import sys

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) == 3
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "match the model's own soft-capped logits" in done.stdout
    assert "trained with rlhf_fast's loss" in done.stdout
    assert "CausalLMOutputForPPO (1, 12) (1, 12)" in done.stdout


def test_import_rlhf_fast_imports_no_integration():
    import subprocess
    import sys

    code = ("import sys, rlhf_fast, rlhf_fast.integrations\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('trl', 'verl', 'transformers')\n"
            "       or m.startswith('rlhf_fast.integrations.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
