"""The command line's inputs, checked before any model loads: prompt files and saved-model directories.

Each check raises :class:`InputError` whose one-line message says what is wrong and how to fix
it; the commands print it as ``python -m rlhf_fast <command>: error: <message>`` and exit with
code 2 (as argparse does for a bad flag), without a traceback. Only files are read here (JSON,
``config.json`` through ``transformers.AutoConfig``): no weights.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .reward import _HEAD_FILE, _META_FILE

PROMPT_FORMAT = 'one prompt per line, a JSON list of token ids such as [464, 3290] or an object {"input_ids": [...]}'
_TEXT_KEYS = ("prompt", "text", "messages", "content", "query", "question")


class InputError(ValueError):
    """A command-line input that cannot work; the message says what is wrong and how to fix it."""


def fail(command: str, error: Exception) -> int:
    """Print ``python -m rlhf_fast <command>: error: <message>`` (one line) to stderr; return exit code 2."""
    message = " ".join(str(error).split())
    print(f"python -m rlhf_fast {command}: error: {message}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- prompts


def read_prompts(path: str, vocab_size: Optional[int] = None, flag: str = "--prompts") -> List[List[int]]:
    """Token-id lists from a JSONL file (``PROMPT_FORMAT``); every line checked, each problem named by line.

    ``vocab_size``: token ids must lie in ``[0, vocab_size)`` (the policy's vocabulary).
    """
    if not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such file; pass a JSONL file with {PROMPT_FORMAT}")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a directory; pass a JSONL file with {PROMPT_FORMAT}")
    prompts: List[List[int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    prompts.append(_prompt_from_line(line, f"{flag} {path} line {number}", vocab_size))
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a JSONL "
                         f"file with {PROMPT_FORMAT}") from None
    if not prompts:
        raise InputError(f"{flag} {path} holds no prompts; write {PROMPT_FORMAT}")
    return prompts


def _prompt_from_line(line: str, where: str, vocab_size: Optional[int]) -> List[int]:
    try:
        item = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); the file needs "
                         f"{PROMPT_FORMAT}") from None
    if isinstance(item, dict):
        if "input_ids" not in item:
            keys = sorted(item)[:6]
            hint = ("; a text prompt must be tokenized first (the policy tokenizer's input_ids)"
                    if any(k in item for k in _TEXT_KEYS) else "")
            raise InputError(f'{where}: the object has no "input_ids" (its keys: {keys}){hint}; the file needs '
                             f"{PROMPT_FORMAT}")
        ids = item["input_ids"]
    elif isinstance(item, list):
        ids = item
    else:
        raise InputError(f"{where}: a JSON {type(item).__name__}, not a prompt; the file needs {PROMPT_FORMAT}")
    if not isinstance(ids, list):
        raise InputError(f"{where}: input_ids must be a list of token ids, got a JSON {type(ids).__name__}")
    if ids and all(isinstance(x, list) for x in ids):
        raise InputError(f"{where}: a list of lists (a batch); write one prompt per line as a flat list of token ids")
    bad = next((x for x in ids if not isinstance(x, int) or isinstance(x, bool)), None)
    if bad is not None:
        raise InputError(f"{where}: token ids must be integers, got {bad!r}; the file needs {PROMPT_FORMAT}")
    if not ids:
        raise InputError(f"{where}: an empty prompt; every prompt needs at least one token")
    if vocab_size is not None:
        out = next((x for x in ids if not 0 <= x < vocab_size), None)
        if out is not None:
            raise InputError(f"{where}: token id {out} is outside the policy's vocabulary [0, {vocab_size}); were "
                             "the prompts tokenized with another tokenizer? Use the policy's tokenizer")
    return ids


def check_enough_prompts(prompts: List[List[int]], batch: int, path: str) -> None:
    if len(prompts) < batch:
        raise InputError(f"--prompts {path} holds {len(prompts)} prompts but --batch is {batch} (distinct prompts "
                         f"per step): lower --batch to at most {len(prompts)} or add prompts")


# ----------------------------------------------------------------------------- model directories


def _check_directory(path: str, flag: str, what: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such directory; pass {what}")
    if not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a directory; pass {what}")


def _has_weights(path: str) -> bool:
    return any(name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth"))
               for name in os.listdir(path))


@dataclass
class LMInfo:
    """What a saved causal LM's ``config.json`` says: vocabulary size and special tokens."""

    path: str
    vocab_size: Optional[int]
    eos_token_id: Any
    pad_token_id: Any


def check_lm_directory(path: str, flag: str = "--policy") -> LMInfo:
    """A directory written by ``save_pretrained`` (config.json and weights; not a reward model)."""
    what = "a directory written by model.save_pretrained(DIR) (a local directory, not a Hub id)"
    _check_directory(path, flag, what)
    if os.path.exists(os.path.join(path, _META_FILE)):
        raise InputError(f"{flag} {path} is a saved reward model, not a causal LM; pass the policy's directory "
                         "(model.save_pretrained(DIR))")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise InputError(f"{flag} {path} has no config.json, so it is not a saved transformers model; pass {what}")
    if not _has_weights(path):
        raise InputError(f"{flag} {path} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
                         f"pass {what}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{flag} {path}: its config.json cannot be read ({first_line(exc)})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LMInfo(path, getattr(text, "vocab_size", None), getattr(config, "eos_token_id", None),
                  getattr(config, "pad_token_id", None))


def check_reward_model_directory(path: str, flag: str = "--reward-model") -> Dict[str, Any]:
    """A directory written by ``rf.save_reward_model``; returns its ``reward_model.json``."""
    how = "train one with rf.train_reward_model and save it with rf.save_reward_model(model, DIR)"
    _check_directory(path, flag, f"a directory written by rf.save_reward_model ({how})")
    meta_path = os.path.join(path, _META_FILE)
    if not os.path.exists(meta_path):
        kind = ("a plain transformers model directory" if os.path.exists(os.path.join(path, "config.json"))
                else "not a model directory")
        raise InputError(f"{flag} {path} is {kind}, not a saved reward model (no {_META_FILE}): {how}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        backbone_class = meta["backbone_class"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{flag} {path}: {_META_FILE} is unreadable ({first_line(exc)}); save the model again "
                         "with rf.save_reward_model(model, DIR)") from None
    import transformers

    if not hasattr(transformers, str(backbone_class)):
        raise InputError(f"{flag} {path}: its backbone class {backbone_class!r} is not in this transformers "
                         f"{transformers.__version__}; install the version that saved it")
    for name in (_HEAD_FILE, "config.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise InputError(f"{flag} {path} is incomplete (no {name}); save it again with "
                             "rf.save_reward_model(model, DIR)")
    return meta


def is_calibrated(meta: Dict[str, Any]) -> bool:
    """What ``RewardModel.is_calibrated`` will say, read from ``reward_model.json``."""
    return not (meta.get("score_mean", 0.0) == 0.0 and meta.get("score_std", 1.0) == 1.0)


def check_directory(path: Optional[str], flag: str, what: str) -> None:
    """An optional directory flag (e.g. a tokenizer): must exist when given."""
    if path is not None:
        _check_directory(path, flag, what)


def special_tokens(eos_flag: Optional[int], pad_flag: Optional[int], info: LMInfo) -> Tuple[int, int]:
    """``(eos, pad)``: the flags, else the policy config's ids; pad defaults to EOS. Each must be one valid id."""
    eos = _token_id(eos_flag, "--eos-token-id", info, "eos_token_id")
    if pad_flag is None and info.pad_token_id is None:
        return eos, eos
    return eos, _token_id(pad_flag, "--pad-token-id", info, "pad_token_id")


def _token_id(value: Any, flag: str, info: LMInfo, config_key: str) -> int:
    source = flag if value is not None else f"{config_key} in {os.path.join(info.path, 'config.json')}"
    value = value if value is not None else getattr(info, config_key)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise InputError(f"{source} lists several ids {list(value)}; pass one with {flag}")
        value = value[0]
    if value is None:
        raise InputError(f"the policy's config.json ({info.path}) has no {config_key}; pass it with {flag}")
    if not isinstance(value, int) or value < 0 or (info.vocab_size is not None and value >= info.vocab_size):
        raise InputError(f"{source} = {value!r} is not a token id of the policy's vocabulary [0, {info.vocab_size}); "
                         f"pass a valid one with {flag}")
    return value


def positive(value: Any, flag: str, integer: bool = True) -> None:
    ok = (isinstance(value, int) and value >= 1) if integer else (math.isfinite(value) and value > 0)
    if not ok:
        raise InputError(f"{flag} must be {'an integer >= 1' if integer else 'a finite number > 0'}, got {value}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
