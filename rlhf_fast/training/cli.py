"""The training command line: options generated from a config dataclass, and the ``ppo`` command.

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
import typing
from typing import Any, Dict, Iterable, List, Type, TypeVar

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


# ----------------------------------------------------------------------------- python -m rlhf_fast ppo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m rlhf_fast ppo``: model paths, then every PPOConfig field."""
    from .config import PPOConfig

    io = parser.add_argument_group("inputs")
    io.add_argument("--policy", required=True, help="directory of a saved causal LM (save_pretrained)")
    io.add_argument("--ref-policy", default=None, help="directory of the reference LM (default: --policy)")
    io.add_argument("--reward-model", required=True, help="directory written by rf.save_reward_model")
    io.add_argument("--prompts", required=True,
                    help="JSONL file: one prompt per line, a list of token ids or {'input_ids': [...]}")
    io.add_argument("--eos-token-id", type=int, default=None, help="default: the policy config's eos_token_id")
    io.add_argument("--pad-token-id", type=int, default=None, help="default: the policy config's, else EOS")
    io.add_argument("--tokenizer", default=None, help="policy tokenizer directory (checked against the RM's)")
    io.add_argument("--reward-tokenizer", default=None, help="reward-model tokenizer directory")
    add_dataclass_arguments(parser, PPOConfig)


def read_prompts(path: str) -> List[List[int]]:
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                prompts.append(list(item["input_ids"] if isinstance(item, dict) else item))
    return prompts


def main(args) -> int:
    """Entry point of ``python -m rlhf_fast ppo``: trains, then saves the policy to out_dir/policy.

    Under ``torchrun`` it joins the process group first (NCCL on ``cuda:LOCAL_RANK``, gloo on
    CPU) and trains data-parallel (``--data-parallel``); rank 0 prints and saves.
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import distributed
    from .config import PPOConfig, validate
    from .reward import load_reward_model
    from .trainer import train

    cfg = dataclass_from_args(PPOConfig, args)
    joins_group = not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env()  # None unless launched by torchrun
    validate(cfg)
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.ref_policy or args.policy)
    reward_model = load_reward_model(args.reward_model)
    if device is not None:
        for model in (policy, ref_policy, reward_model):
            model.to(device)
    eos = args.eos_token_id if args.eos_token_id is not None else policy.config.eos_token_id
    pad = args.pad_token_id if args.pad_token_id is not None else policy.config.pad_token_id
    pad = eos if pad is None else pad
    policy_tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    reward_tok = AutoTokenizer.from_pretrained(args.reward_tokenizer) if args.reward_tokenizer else None
    records = train(cfg, policy, ref_policy, reward_model, read_prompts(args.prompts), eos_token_id=eos,
                    pad_token_id=pad, policy_tokenizer=policy_tok, reward_tokenizer=reward_tok)
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
