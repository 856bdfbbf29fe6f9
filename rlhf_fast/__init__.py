"""rlhf_fast: a fused, trustworthy PPO loss for RLHF, and a lean PPO loop around it.

Layers (docs/architecture.md), lower ones never importing upper ones:

* :mod:`rlhf_fast.backends` — the row backends (Triton, C++) and the registry;
* :mod:`rlhf_fast.loss` — the loss: options, reference, functional API, autograd,
  fused-linear, vocab-parallel, ``nn.Module``;
* :mod:`rlhf_fast.monitor` — early warning of reward hacking from a run's per-step metrics;
* :mod:`rlhf_fast.training` — reward model, PPO loop, checkpoints, data parallel, CLI;
* :mod:`rlhf_fast.casestudy` — the main job, on the public API only.

``import rlhf_fast`` is lean: it never imports triton or transformers, touches CUDA or
compiles anything; backends load on first use, the monitor and the training layer on first access.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from . import loss
from .loss import *  # noqa: F403  the loss layer's public names (loss.__all__) are the package's

__version__ = "0.1.0"

__all__ = list(loss.__all__)

# The training layer: imported on first attribute access, so ``import rlhf_fast`` stays lean.
_LAZY_EXPORTS = {
    "RewardModel": "training.reward", "RewardTrainConfig": "training.reward",
    "bradley_terry_loss": "training.reward", "train_reward_model": "training.reward",
    "calibrate": "training.reward", "save_reward_model": "training.reward", "load_reward_model": "training.reward",
    "PPOConfig": "training.config", "validate_ppo_config": "training.config:validate",
    "StepRecord": "training.records", "Rollout": "training.records", "Samples": "training.records",
    "train_ppo": "training.trainer:train",
    "ADVANTAGE_ESTIMATORS": "training.advantages", "gae_advantages": "training.advantages",
    "grpo_advantages": "training.advantages", "rloo_advantages": "training.advantages",
    "whiten": "training.advantages",
    "AdaptiveKLController": "training.kl_control", "FixedKLController": "training.kl_control",
    "RewardHackingMonitor": "monitor", "load_run": "monitor:load", "analyse_run": "monitor:analyse",
}

# Modules of the flat layout of earlier releases, kept importable under their old names.
_MOVED_MODULES = {
    "config": "loss.options", "functional": "loss.functional", "reference": "loss.reference",
    "autograd": "loss.autograd", "fused_linear": "loss.fused_linear", "vocab_parallel": "loss.vocab_parallel",
    "module": "loss.module", "demo": "loss.demo", "triton_ops": "backends.triton", "cpp_ops": "backends.cpp",
    "ppo": "training", "reward": "training.reward", "advantages": "training.advantages",
    "kl_control": "training.kl_control", "checkpoint": "training.checkpoint",
    "distributed": "training.distributed", "cli": "training.cli",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import rlhf_fast.<old name>`` gives the module at its new place (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == __name__ and name in _MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{_MOVED_MODULES[spec.name.partition('.')[2]]}")

    def exec_module(self, module):
        pass  # already executed under its new name


sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str):
    if name in _MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    target = _LAZY_EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), attr or name)
