"""The training command line: options generated from a config dataclass, and the ``ppo`` command.

The ``ppo`` command checks every input before it loads a model (:mod:`.cli_inputs`): a
problem prints one ``error:`` line saying what is wrong and how to fix it, exit code 2.

:func:`add_dataclass_arguments` turns each field into ``--field-name`` with the help text
in its ``metadata["help"]`` (:func:`rlhf_fast.loss.options.option`); ``bool`` fields get
``--flag / --no-flag``; ``Optional[X]`` fields also accept ``none``; ``Literal[...]`` fields
get their choices. Reusable for any config dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, TypeVar

from .cli_inputs import (
    PROMPT_FORMAT,
    InputError,
    check_directory,
    check_enough_prompts,
    check_lm_directory,
    check_reward_model_directory,
    fail,
    first_line,
    is_calibrated,
    read_prompts,
    special_tokens,
)
from .models import check_compatibility

T = TypeVar("T")


def field_help(cls: type) -> Dict[str, str]:
    """The help text of each field of a dataclass (``field(metadata={"help": ...})``)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _unwrap_optional(tp) -> tuple:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser_for(tp, optional: bool):
    base = tp
    if typing.get_origin(tp) is typing.Literal:
        base = type(typing.get_args(tp)[0])

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        return base(text)

    parse.__name__ = getattr(base, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: Iterable[str] = ()) -> None:
    """Add one ``--option`` per field of dataclass ``cls`` (defaults from the dataclass)."""
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{docs.get(field.name, '')} (default: {default})".replace("%", "%%")
        if tp is bool and not optional:
            group.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        kwargs: Dict[str, Any] = {"dest": field.name, "default": default, "type": _parser_for(tp, optional)}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp)) + ([None] if optional else [])
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(tp))) + "}"
        elif optional:
            kwargs["metavar"] = f"{getattr(tp, '__name__', 'VALUE').upper()}|none"
        group.add_argument(flag, help=help_text, **kwargs)


def dataclass_from_args(cls: Type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from the parsed options that :func:`add_dataclass_arguments` added."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def config_from_args(cls: Type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """:func:`dataclass_from_args`, with the config's ``ValueError`` as an :class:`InputError` naming the flags."""
    try:
        return dataclass_from_args(cls, args, **overrides)
    except ValueError as exc:
        raise InputError(flag_message(str(exc), cls)) from None


def flag_message(message: str, cls: type) -> str:
    """A config's problems on one line, with its field names written as the flags that set them."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    names = sorted((f.name for f in dataclasses.fields(cls)), key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")

    def to_flag(match: re.Match) -> str:
        name = match.group(1)
        return "--" + name.replace("_", "-") if "_" in name or match.start() == 0 else name

    return "invalid options: " + "; ".join(pattern.sub(to_flag, line) for line in lines)


# ----------------------------------------------------------------------------- python -m rlhf_fast ppo

POLICY_HELP = "directory of a saved causal LM (model.save_pretrained(DIR))"
REWARD_MODEL_HELP = "directory written by rf.save_reward_model"
PROMPTS_HELP = f"JSONL file: {PROMPT_FORMAT}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m rlhf_fast ppo``: model paths, then every PPOConfig field."""
    from .config import PPOConfig

    io = parser.add_argument_group("inputs")
    io.add_argument("--policy", required=True, help=POLICY_HELP)
    io.add_argument("--ref-policy", default=None, help="directory of the reference LM (default: --policy)")
    io.add_argument("--reward-model", required=True,
                    help=f"{REWARD_MODEL_HELP} (calibrated by `python -m rlhf_fast calibrate` for --reward-normalize)")
    io.add_argument("--prompts", required=True, help=PROMPTS_HELP)
    io.add_argument("--eos-token-id", type=int, default=None, help="default: the policy config's eos_token_id")
    io.add_argument("--pad-token-id", type=int, default=None, help="default: the policy config's, else EOS")
    io.add_argument("--tokenizer", default=None, help="policy tokenizer directory (checked against the RM's)")
    io.add_argument("--reward-tokenizer", default=None, help="reward-model tokenizer directory")
    add_dataclass_arguments(parser, PPOConfig)


def check_inputs(args: argparse.Namespace, batch: int, reward_normalize: bool) -> Tuple[List[List[int]], int, int]:
    """Every file the ``ppo`` command reads, checked before any model loads: ``(prompts, eos, pad)``."""
    policy = check_lm_directory(args.policy, "--policy")
    if args.ref_policy is not None:
        check_lm_directory(args.ref_policy, "--ref-policy")
    meta = check_reward_model_directory(args.reward_model)
    tokenizer_help = "a directory written by tokenizer.save_pretrained(DIR)"
    check_directory(args.tokenizer, "--tokenizer", tokenizer_help)
    check_directory(args.reward_tokenizer, "--reward-tokenizer", tokenizer_help)
    prompts = read_prompts(args.prompts, policy.vocab_size)
    check_enough_prompts(prompts, batch, args.prompts)
    if reward_normalize and not is_calibrated(meta):
        raise InputError(
            f"--reward-normalize needs a calibrated reward model and {args.reward_model} is not calibrated: run "
            f"`python -m rlhf_fast calibrate --reward-model {args.reward_model} --policy "
            f"{args.ref_policy or args.policy} --prompts {args.prompts}` first, or drop --reward-normalize")
    eos, pad = special_tokens(args.eos_token_id, args.pad_token_id, policy)
    return prompts, eos, pad


def load_causal_lm(path: str, flag: str):
    """``AutoModelForCausalLM.from_pretrained(path)`` (a checked directory); failures as an InputError."""
    from transformers import AutoModelForCausalLM

    from .hf_models import from_pretrained

    try:
        return from_pretrained(AutoModelForCausalLM, path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{flag} {path}: cannot load a causal LM from it ({first_line(exc)})") from None


def load_reward(path: str):
    """:func:`~.reward.load_reward_model` of a checked directory; failures as an InputError."""
    from .reward import load_reward_model

    try:
        return load_reward_model(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"--reward-model {path}: cannot load it ({first_line(exc)}); save it again with "
                         "rf.save_reward_model(model, DIR)") from None


def load_tokenizer(path: Optional[str], flag: str):
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{flag} {path}: cannot load a tokenizer from it ({first_line(exc)})") from None


def compatible(policy, ref_policy, reward_model, eos: int, pad: int, policy_tok=None, reward_tok=None) -> None:
    """:func:`~.models.check_compatibility` (same vocabulary, valid special tokens) as an InputError."""
    try:
        check_compatibility(policy, ref_policy, reward_model, eos, pad, policy_tok, reward_tok)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def main(args) -> int:
    """Entry point of ``python -m rlhf_fast ppo``: trains, then saves the policy to out_dir/policy.

    Every input is checked first (files before any model loads); a problem prints one
    ``error:`` line and returns 2. Under ``torchrun`` it joins the process group (NCCL on
    ``cuda:LOCAL_RANK``, gloo on CPU) and trains data-parallel (``--data-parallel``); rank 0
    prints and saves.
    """
    import torch.distributed as dist

    from . import distributed
    from .config import PPOConfig, validate
    from .trainer import train

    try:
        cfg = config_from_args(PPOConfig, args)
        prompts, eos, pad = check_inputs(args, cfg.batch, cfg.reward_normalize)
    except InputError as exc:
        return fail("ppo", exc)
    joins_group = not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env()  # None unless launched by torchrun
    try:
        try:
            validate(cfg)
        except ValueError as exc:
            raise InputError(flag_message(str(exc), PPOConfig)) from None
        policy = load_causal_lm(args.policy, "--policy")
        ref_policy = load_causal_lm(args.ref_policy or args.policy, "--ref-policy" if args.ref_policy else "--policy")
        reward_model = load_reward(args.reward_model)
        policy_tok = load_tokenizer(args.tokenizer, "--tokenizer")
        reward_tok = load_tokenizer(args.reward_tokenizer, "--reward-tokenizer")
        compatible(policy, ref_policy, reward_model, eos, pad, policy_tok, reward_tok)
    except InputError as exc:
        if device is not None and joins_group:
            dist.destroy_process_group()
        return fail("ppo", exc)
    if device is not None:
        for model in (policy, ref_policy, reward_model):
            model.to(device)
    records = train(cfg, policy, ref_policy, reward_model, prompts, eos_token_id=eos, pad_token_id=pad,
                    policy_tokenizer=policy_tok, reward_tokenizer=reward_tok)
    policy_dir = os.path.join(cfg.out_dir, "policy")
    if distributed.resolve_data_parallel(cfg.data_parallel) is None:
        policy.save_pretrained(policy_dir)
        is_main = True
    else:
        weights = distributed.full_state_dict(policy)  # collective (FSDP2 gathers the shards); rank 0 gets it
        is_main = dist.get_rank() == 0
        if is_main:
            policy.save_pretrained(policy_dir, state_dict=weights)
    if records and is_main:
        print(json.dumps(records[-1].to_dict()))
    if device is not None and joins_group:
        dist.destroy_process_group()
    return 0
