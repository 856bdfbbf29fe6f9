"""Command-line options generated from a config dataclass.

Each field becomes ``--field-name``; its help is the one-line docstring written under
the field; ``bool`` fields get ``--flag / --no-flag``; ``Optional[X]`` fields also accept
``none``; ``Literal[...]`` fields get their choices. Reusable for any config dataclass
(the PPO and case-study subcommands both use it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Dict, Iterable, Type, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> Dict[str, str]:
    """The docstring written right under each field of a dataclass (from its source)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


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
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} (see its docstrings)")
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{docs.get(field.name, '')} (default: {default})"
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
