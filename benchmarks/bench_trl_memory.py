"""Peak memory of one TRL GRPO training step: TRL's own loss vs the rlhf_fast integration (CPU-measured).

Run: ``pytest benchmarks/bench_trl_memory.py`` (``-s`` prints every number). The step is what
``GRPOTrainer`` does per micro-batch after generation: ``trainer.compute_loss(model, batch)``
then ``accelerator.backward(loss)``, on a batch of 8 completions × 256 tokens = 2048 completion
tokens (16-token prompts), with TRL's default ``GRPOConfig`` (``loss_type="dapo"``, ``beta=0``)
in fp32 (``bf16=False``). The model is a one-layer Llama built from a config (hidden 64) with
a realistic vocabulary, V = 128256 (Llama 3's), untied LM head: the loss's ``[tokens, V]``
work dominates, as it does for real policies at long completions.

* TRL's default path: the model's fused LM head that ``GRPOTrainer`` installs
  (``trl.trainer.utils.add_fused_lm_head``: log-probs and entropy by tiles of 4096 tokens ×
  32768 vocabulary entries, torch ops on CPU), then TRL's loss on ``[B, T]`` tensors;
* rlhf_fast: ``RLHFFastGRPOTrainer`` (``rf.fused_linear_ppo_loss`` on the hidden states and the
  LM head, row backend ``auto``: the C++ kernels when built).

Peak memory above the inputs: each path runs once in a fresh subprocess (``machine.py``): the
model, trainer and batch are built, the kernel's peak-RSS counter is reset, one step runs, and
peak RSS (VmHWM) minus the RSS at the reset is reported; both include the parameters'
``.grad`` (the LM head's alone is 31 MiB). The bar (≤ 0.3× TRL's) is asserted. Time: one step
of each path in this process (TRL's timed by hand in the untimed setup, ours by
pytest-benchmark), reported only.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
from bars import assert_bars, at_most
from machine import cpu_name, peak_in_fresh_process, print_peak

SHAPE = dict(batch=8, prompt=16, completion=256, hidden=64, vocab=128256)
MEMORY_BAR = 0.3
PATHS = ("trl", "rlhf_fast")


def build(path: str):
    """(trainer, batch) for one GRPO micro-batch of SHAPE; ``path`` picks TRL's loss or rlhf_fast's."""
    import datasets
    import transformers
    import trl
    from tokenizers import Tokenizer, models

    from rlhf_fast.integrations.trl import RLHFFastGRPOTrainer

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    b, p, c, v = SHAPE["batch"], SHAPE["prompt"], SHAPE["completion"], SHAPE["vocab"]
    config = transformers.LlamaConfig(vocab_size=v, hidden_size=SHAPE["hidden"], intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=p + c, pad_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>")
    args = trl.GRPOConfig(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rlhf_fast_bench_trl"),
                          per_device_train_batch_size=b, num_generations=b, max_completion_length=c, bf16=False,
                          use_cpu=True, report_to=[], save_strategy="no")
    cls = RLHFFastGRPOTrainer if path == "rlhf_fast" else trl.GRPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                  train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * b}), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    gen = torch.Generator().manual_seed(1)
    completion_mask = torch.ones(b, c, dtype=torch.long)
    for row in range(1, b):  # completions of different lengths, as after EOS
        completion_mask[row, c - 16 * row:] = 0
    batch = {
        "prompt_ids": torch.randint(2, v, (b, p), generator=gen), "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(2, v, (b, c), generator=gen), "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=gen), "num_items_in_batch": completion_mask.sum().float(),
    }
    return trainer, batch


def step(trainer, batch) -> float:
    loss = trainer.compute_loss(trainer.model, batch)
    trainer.accelerator.backward(loss)
    return loss.item()


def _clear(trainer) -> None:
    trainer.model.zero_grad(set_to_none=True)


def test_cpu_trl_grpo_step_memory(benchmark):
    memory = {path: peak_in_fresh_process(__file__, ["--memory", path]) for path in PATHS}
    trl_trainer, batch = build("trl")
    ours, _ = build("rlhf_fast")
    ours.model.load_state_dict(trl_trainer.model.state_dict())
    trl_times, our_times, losses = [], [], {}

    def run_trl_untimed_by_benchmark():
        _clear(trl_trainer)
        start = time.perf_counter()
        losses["trl"] = step(trl_trainer, batch)
        trl_times.append(time.perf_counter() - start)
        _clear(trl_trainer)
        _clear(ours)

    def run_ours():
        start = time.perf_counter()
        losses["rlhf_fast"] = step(ours, batch)
        our_times.append(time.perf_counter() - start)

    n_tokens = int(batch["completion_mask"].numel())
    benchmark.group = f"TRL GRPO step CPU B×T={n_tokens} V={SHAPE['vocab']} fp32"
    benchmark.pedantic(run_ours, setup=run_trl_untimed_by_benchmark, rounds=1, iterations=1, warmup_rounds=0)
    info = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "shape": dict(SHAPE, completion_tokens=n_tokens),
        "loss_trl": losses["trl"], "loss_rlhf_fast": losses["rlhf_fast"],
        "trl_step_s": statistics.median(trl_times), "rlhf_fast_step_s": statistics.median(our_times),
    }
    if memory["trl"] is not None:
        info.update(trl_peak_above_inputs_MiB=memory["trl"] / 2**20,
                    rlhf_fast_peak_above_inputs_MiB=memory["rlhf_fast"] / 2**20,
                    memory_ratio=memory["rlhf_fast"] / memory["trl"])
        benchmark.extra_info["vs_eager"] = (
            f"rlhf_fast in TRL: peak memory above the inputs {info['memory_ratio']:.2g}× TRL's default path's "
            f"({info['rlhf_fast_peak_above_inputs_MiB']:.0f} vs {info['trl_peak_above_inputs_MiB']:.0f} MiB); "
            f"one step {info['rlhf_fast_step_s']:.3g} s vs {info['trl_step_s']:.3g} s (one run each)")
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
    assert abs(losses["trl"] - losses["rlhf_fast"]) <= 1e-5 * max(1.0, abs(losses["trl"])), losses
    assert_bars([at_most("peak memory over TRL's default path's", info.get("memory_ratio", math.nan), MEMORY_BAR)],
                f"TRL GRPO step, {n_tokens} tokens, V={SHAPE['vocab']}")  # NaN (failed) without Linux's /proc


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--memory":
    trainer, batch = build(sys.argv[2])
    print_peak(lambda: step(trainer, batch))
