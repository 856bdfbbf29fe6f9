"""Use the fused-linear loss inside other trainers (docs/integrations.md).

* :mod:`rlhf_fast.integrations.transformers` — the hidden states and LM head of any Hugging Face
  causal LM, with the output transform its forward applies to the logits (scale, soft-cap);
* :mod:`rlhf_fast.integrations.trl` — ``RLHFFastGRPOTrainer`` / ``equip(trainer)`` for TRL's
  ``GRPOTrainer`` (one record per ``loss_type``; the loss of a micro-batch in ``trl_loss``, and
  everything that reads TRL's internals in ``trl_shim``, written for TRL 1.16.0);
* :mod:`rlhf_fast.integrations.verl` — the forward verl's fused-kernel actor calls
  (``fused_kernel_options.impl_backend=rlhf_fast``);
* :mod:`rlhf_fast.integrations.trl_monitor`, :mod:`rlhf_fast.integrations.verl_monitor` — the
  reward-hacking monitor (:mod:`rlhf_fast.monitor`) inside TRL (a ``TrainerCallback``) and verl (a
  hook on its metrics logger).

This package imports nothing heavy; each submodule imports its framework (transformers, trl,
verl) when it is imported itself. The integrations are the top layer: they use the loss and
training layers, and nothing in rlhf_fast imports them.
"""

__all__ = ["transformers", "trl", "trl_monitor", "verl", "verl_monitor"]
