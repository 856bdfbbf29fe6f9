"""Name → implementation registries that list the known names when asked for an unknown one."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional


class Registry:
    """A small ordered registry: ``register(name, obj)``, ``get(name)``, ``check(name)``.

    ``get``/``check`` of an unknown name raise ``ValueError`` naming the argument and
    listing every registered name.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator."""
        if obj is None:
            def decorate(fn: Callable) -> Callable:
                self.register(name, fn)
                return fn

            return decorate
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def check(self, name: str, argument: Optional[str] = None) -> None:
        if name not in self._entries:
            what = argument or self.kind
            raise ValueError(f"{what} must be one of {self.names()}, got {name!r} (unknown {self.kind})")

    def get(self, name: str, argument: Optional[str] = None) -> Any:
        self.check(name, argument)
        return self._entries[name]

    def names(self) -> tuple:
        return tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
