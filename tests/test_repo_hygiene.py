"""The repository stands alone and its front page is true.

* No file points outside the repository: no parent-directory paths to the project's former
  shared folder, no section numbers of an external spec, no tracker numbers.
* Every relative link in README.md and docs/*.md resolves to a file of the repository (tracked,
  or new and not ignored: what a fresh clone has before anything is run), anchors included.
* The README's commands are the ones CI runs: its quick start is the two make commands of
  ``.ci/run``, which run the README's own test and main-job commands in the environment they set
  up; its peer installs are the Makefile's; its main-job command is a registered subcommand whose
  flags parse, and the ``-m`` markers it names are declared in pyproject.toml.
* Every README python block that names an example script is that script, verbatim (the
  examples are run by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import re
import shlex
import subprocess
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTSIDE_REFERENCES = re.compile(r"\.\./shared|SPEC" + r" §|issue [0-9]")
IGNORED_DIRS = {".git", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks",
                ".hypothesis"}


def repo_files() -> List[str]:
    """Files a fresh clone has: tracked, plus new ones git does not ignore (a walk where git is absent)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        return sorted(p for p in listed if p and (ROOT / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        found = []
        for directory, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info")]
            found += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files
                      if not f.endswith((".so", ".pyc"))]
        return sorted(found)


def text_of(path: str):
    try:
        return (ROOT / path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # a binary file (figures)


def test_nothing_points_outside_the_repository():
    hits = []
    for path in repo_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_REFERENCES.search(line):
                hits.append(f"{path}:{number}: {line.strip()[:120]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------- links


def _without_fences(markdown: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", markdown, flags=re.S | re.M)


def _without_code(markdown: str) -> str:
    """The markdown with fenced blocks and inline code spans blanked (their brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(markdown))


def links_of(markdown: str) -> List[str]:
    text = _without_code(markdown)
    links = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    links += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    links += re.findall(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", text)
    return links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(markdown: str) -> Set[str]:
    anchors: Set[str] = set()
    counts: Dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", _without_fences(markdown), flags=re.M):
        base = github_anchor(heading)
        anchors.add(base if base not in counts else f"{base}-{counts[base]}")
        counts[base] = counts.get(base, 0) + 1
    return anchors


def documents() -> List[str]:
    return [p for p in repo_files() if p == "README.md" or re.fullmatch(r"docs/[^/]+\.md", p)]


def test_every_relative_link_resolves():
    files = set(repo_files())
    directories = {str(pathlib.PurePosixPath(f).parent) for f in files} | {
        str(parent) for f in files for parent in pathlib.PurePosixPath(f).parents}
    broken = []
    for document in documents():
        text = text_of(document)
        for link in links_of(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link, flags=re.I):  # http:, https:, mailto:, ...
                continue
            target, _, anchor = link.partition("#")
            target = target.split("?")[0]
            if not target:  # an anchor in the same document
                resolved, target_text = document, text
            else:
                resolved = os.path.normpath(os.path.join(os.path.dirname(document), target)).replace(os.sep, "/")
                if resolved not in files and resolved.rstrip("/") not in directories:
                    broken.append(f"{document}: {link} (no file {resolved} in the repository)")
                    continue
                target_text = text_of(resolved) if resolved in files else None
            if anchor and resolved.endswith(".md") and target_text is not None:
                if anchor.lower() not in anchors_of(target_text):
                    broken.append(f"{document}: {link} (no heading with anchor #{anchor} in {resolved})")
    assert documents(), "no README.md found"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_finds_broken_links():
    sample = ("See [a](docs/nothing.md), ![f](runs/x.png \"t\"), [ok](https://example.com), `[no](code.md)`\n"
              "```\n[no](in_fence.md)\n```\n[ref]: docs/ref.md\n## A `code` heading — with × signs!\n")
    assert links_of(sample) == ["docs/nothing.md", "runs/x.png", "https://example.com", "docs/ref.md"]
    assert anchors_of(sample) == {"a-code-heading--with--signs"}


# ----------------------------------------------------------------------------- README commands


def readme_commands() -> List[str]:
    """Command lines of the README's bash blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text_of("README.md"), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def ci_commands() -> List[str]:
    return [" ".join(line.split()) for line in text_of(".ci/run").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} :?= (.*)$", text_of("Makefile"), flags=re.M)
    assert match, f"the Makefile defines no {name}"
    return match.group(1).strip()


def makefile_recipe(target: str) -> List[str]:
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text_of("Makefile"), flags=re.M)
    assert match, f"the Makefile has no target {target}"
    return [line.strip() for line in match.group(1).splitlines()]


def test_the_quick_start_is_the_two_commands_ci_runs():
    section = text_of("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    assert block, "the README's quick start shows no bash block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert commands == ["make casestudy", "make test"], commands
    ci = ci_commands()
    assert all(command in ci for command in commands), f".ci/run does not run {commands}"
    assert ci.index("make casestudy") < ci.index("make test")
    assert any("rm -rf .venv" in line for line in ci), ".ci/run must start from no virtual environment"


def test_the_make_targets_run_the_readme_commands():
    """``make test`` and ``make casestudy`` run, in .venv, the README's commands for an environment of one's own."""
    readme = readme_commands()
    for target, command in (("test", "python -m pytest tests -q"), ("casestudy", "python -m rlhf_fast casestudy")):
        assert command in readme, f"the README does not show {command!r}"
        recipe = " ".join(makefile_recipe(target))
        assert f"$(BIN)/{command}" in recipe, f"make {target} does not run {command!r}: {recipe}"


def test_the_readme_installs_the_peers_as_the_makefile_does():
    readme = {re.sub(r"^(python -m )?pip install( -q)?", "pip install", c) for c in readme_commands()}
    verl, chain = makefile_variable("VERL"), makefile_variable("VERL_IMPORT_CHAIN")
    assert f"pip install --no-deps {verl}" in readme, f"the README does not install {verl} as the Makefile does"
    assert f"pip install {chain}" in readme, f"the README does not install verl's import chain {chain}"
    versions = text_of("README.md").split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    for name, version in re.findall(r'"(trl|accelerate|datasets|verl)==([^"]+)"', text_of("pyproject.toml")):
        row = next((line for line in versions.splitlines()
                    if line.startswith("|") and re.search(rf"\b{name}\b", line.split("|")[1])), "")
        assert version in row, f"the README's table of versions does not give {name} {version}"


def test_the_readme_pytest_markers_are_declared():
    text = text_of("pyproject.toml")
    declared = set(re.findall(r"^\s*\"(\w+):", text, flags=re.M))
    for command in readme_commands():
        words = shlex.split(command)
        after = words[words.index("pytest") + 1:] if "pytest" in words else []
        if "-m" in after:
            expression = after[after.index("-m") + 1]
            used = set(re.findall(r"\w+", expression)) - {"not", "and", "or"}
            assert used <= declared, f"{command}: markers {used - declared} are not declared in pyproject.toml"


def test_the_readme_main_job_is_a_command_that_parses():
    from rlhf_fast.__main__ import SUBCOMMANDS

    jobs = [c for c in readme_commands() if c.startswith("python -m rlhf_fast ")]
    assert jobs, "the README shows no python -m rlhf_fast command"
    assert jobs[0].split()[3] == "casestudy", f"the first command of the README is not the main job: {jobs[0]}"
    for command in jobs:
        words = [w for w in shlex.split(command)[3:] if w != "..."]  # placeholder values still parse as values
        if not words or words[0] not in SUBCOMMANDS:
            pytest.fail(f"README command {command!r}: unknown subcommand (known: {sorted(SUBCOMMANDS)})")
        parser = argparse.ArgumentParser(exit_on_error=False)
        importlib.import_module(SUBCOMMANDS[words[0]][0]).add_arguments(parser)
        try:
            parser.parse_args(words[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            pytest.fail(f"README command {command!r} does not parse: {exc}")


# ----------------------------------------------------------------------------- README examples


def test_readme_examples_are_the_example_scripts():
    blocks = re.findall(r"^```python\n(# (examples/\S+\.py)\b.*?)^```", text_of("README.md"), flags=re.S | re.M)
    names = [name for _, name in blocks]
    for needed in ("examples/hf_loss_step.py", "examples/train_ppo.py"):
        assert needed in names, f"the README does not show {needed}"
    for block, name in blocks:
        assert (ROOT / name).is_file(), f"the README shows {name}, which does not exist"
        assert block == (ROOT / name).read_text(encoding="utf-8"), f"the README's copy of {name} differs from it"
