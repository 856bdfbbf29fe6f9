"""Print the lowest supported version of every dependency declared in pyproject.toml, as pins.

``make lock`` installs these pins (plus the peers at their fixed versions) into a fresh virtual
environment and freezes it into constraints.txt, so the lock is the lower end of every declared
range. Standard library only, and no third-party TOML parser: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REQUIREMENT = re.compile(r'"([A-Za-z0-9_.\-]+)\s*((?:==|>=)[^",;]+)[^"]*"')


def declared(pyproject: str) -> list[str]:
    """Every quoted requirement in [project] dependencies and optional-dependencies."""
    start = pyproject.index("[project]")
    end = pyproject.find("\n[tool.", start)
    section = pyproject[start:end if end != -1 else None]
    return [f"{name}{spec.split(',')[0]}" for name, spec in REQUIREMENT.findall(section)]


def lowest_pins(requirements: list[str]) -> list[str]:
    """``name>=X`` (with or without an upper bound) becomes ``name==X``; ``name==X`` stays."""
    return sorted({re.sub(r">=", "==", requirement) for requirement in requirements}, key=str.lower)


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    print("\n".join(lowest_pins(declared((root / "pyproject.toml").read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
