"""Print the installed packages whose version differs from a lock file's (``make test-newest``).

When the suite fails against the newest releases, these are the candidates for what broke: each
line names the package, the lock's version and the version installed here. Given the failing
run's log (``--log``), the packages whose files appear in its tracebacks come first, marked: the
likeliest culprits. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def public(version):
    """A version without its local label (2.13.0+cpu is the lock's 2.13.0 built for the CPU)."""
    return version.split("+")[0] if version else version


def differences(lock: dict[str, str], here: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, lock version or '-', installed version or '-') for every package that differs."""
    names = sorted(set(lock) | set(here))
    return [(name, lock.get(name, "-"), here.get(name, "-")) for name in names
            if public(lock.get(name)) != public(here.get(name))
            and name not in ("pip", "setuptools", "wheel", "rlhf-fast")]


def in_tracebacks(log: str) -> set[str]:
    """Canonical names of the installed distributions whose files a log's tracebacks mention."""
    modules = set(re.findall(r"site-packages[/\\]([A-Za-z0-9_]+)", log))
    owners = metadata.packages_distributions()
    return {canonical(dist) for module in modules for dist in owners.get(module, [module])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, default=Path("constraints.txt"), help="the lock file")
    parser.add_argument("--log", type=Path, default=None, help="a failing run's output: its tracebacks rank the list")
    args = parser.parse_args(argv)
    rows = differences(locked(args.against), installed())
    suspects = in_tracebacks(args.log.read_text(errors="replace")) if args.log and args.log.exists() else set()
    rows.sort(key=lambda row: row[0] not in suspects)  # stable: suspects first, each group by name
    print(f"   {len(rows)} packages differ from {args.against} (package: lock -> here)"
          + ("; * = in the failing tracebacks" if suspects else ""))
    for name, lock_version, here_version in rows:
        print(f"   {'*' if name in suspects else ' '} {name}: {lock_version} -> {here_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
