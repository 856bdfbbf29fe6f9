"""A fresh machine: nothing of the repository shadows another distribution, and the lock is the range.

* No top-level folder but ``rlhf_fast`` is a regular package: run from the repository root (where
  every README command runs, and which is first on ``sys.path``), a distribution of the same name
  wins over our folder. The Hugging Face ``kernels`` distribution, which transformers imports, is
  checked for real (the [test] extra installs it): transformers loads, builds a tiny model and
  ``from_pretrained`` a saved one, from the repository root.
* ``kernels/`` installs as ``rlhf_fast.kernels`` only.
* constraints.txt (the lock CI installs) pins every declared dependency at the lower end of its
  range in pyproject.toml, so CI's main run is the lowest supported set; scripts/versions.py names
  what differs from it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import lowest  # noqa: E402
import versions  # noqa: E402

TOP_LEVEL_FOLDERS = sorted(p.name for p in ROOT.iterdir()
                           if p.is_dir() and not p.name.startswith(".") and p.name not in ("build", "dist", "runs")
                           and not p.name.endswith(".egg-info"))


def run_from_root(code: str, **env) -> dict:
    """Run ``python -c code`` with the repository root as the working directory; its last stdout line as JSON."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_only_the_package_is_a_regular_package():
    regular = [name for name in TOP_LEVEL_FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert regular == ["rlhf_fast"], f"top-level folders with an __init__.py: {regular}"
    assert {"kernels", "tests", "benchmarks", "examples", "csrc"} <= set(TOP_LEVEL_FOLDERS)


def test_a_distribution_of_a_folders_name_wins_from_the_repository_root(tmp_path):
    """Install a stand-in package named after each top-level folder; imported from the root, the stand-in wins."""
    names = [name for name in TOP_LEVEL_FOLDERS if name != "rlhf_fast"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("DISTRIBUTION = True\n")
    found = run_from_root(
        "import importlib, json\n"
        f"print(json.dumps({{n: getattr(importlib.import_module(n), 'DISTRIBUTION', False) for n in {names!r}}}))",
        PYTHONPATH=str(tmp_path))
    assert found == dict.fromkeys(names, True)


def test_transformers_and_hub_kernels_work_from_the_repository_root():
    assert importlib.util.find_spec("kernels") is not None, "the [test] extra installs the hub kernels distribution"
    found = run_from_root(
        "import json, tempfile, kernels, transformers\n"
        "from rlhf_fast.integrations.transformers import from_pretrained\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                                  num_attention_heads=2, num_key_value_heads=2)\n"
        "model = transformers.LlamaForCausalLM(config)\n"
        "path = tempfile.mkdtemp()\n"
        "model.save_pretrained(path)\n"
        "default = transformers.AutoModelForCausalLM.from_pretrained(path)\n"
        "ours = from_pretrained(transformers.AutoModelForCausalLM, path)\n"
        "print(json.dumps(dict(kernels=kernels.__file__, ours_kernelized=bool(getattr(ours, 'use_kernels', False)),\n"
        "                      same=all(a.equal(b) for a, b in zip(model.parameters(), ours.parameters())),\n"
        "                      default_loaded=default is not None)))")
    assert "site-packages" in pathlib.Path(found["kernels"]).parts, f"import kernels found {found['kernels']}"
    assert found["default_loaded"] and found["same"]
    assert not found["ours_kernelized"], "rlhf_fast loads models with their own layers (use_kernels=False)"


def test_kernels_folder_installs_as_rlhf_fast_kernels():
    found = run_from_root(
        "import json, rlhf_fast.kernels.ppo_loss as k\nprint(json.dumps(k.__file__))")
    assert pathlib.Path(found).resolve() == (ROOT / "kernels" / "ppo_loss.py").resolve()


def test_the_lock_pins_each_declared_dependency_at_its_lower_bound():
    pins = versions.locked(ROOT / "constraints.txt")
    declared = lowest.lowest_pins(lowest.declared((ROOT / "pyproject.toml").read_text()))
    assert declared, "pyproject.toml declares dependencies"
    wrong = []
    for pin in declared:
        name, version = pin.split("==")
        locked = pins.get(versions.canonical(name))
        # "==2.13" in a range means 2.13.0: compare release numbers padded with zeros
        padded = lambda v: tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])) + (0,) * 3
        if locked is None or padded(locked)[:3] != padded(version)[:3]:
            wrong.append(f"{name}: range starts at {version}, lock has {locked}")
    assert not wrong, "run `make lock`: " + "; ".join(wrong)


@pytest.mark.parametrize("line, expected", [
    ('dependencies = ["torch>=2.13,<2.15", "numpy>=2.0"]', ["numpy==2.0", "torch==2.13"]),
    ('trl = ["trl==1.16.0"]\nx = ["a_b>=1; python_version<\'3.12\'"]', ["a_b==1", "trl==1.16.0"]),
])
def test_lowest_pins(line, expected):
    assert lowest.lowest_pins(lowest.declared("[project]\n" + line + "\n[tool.x]\ny = [\"z>=9\"]\n")) == expected


def test_versions_names_what_differs_from_the_lock(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# comment\nTorch==2.13.0\nnumpy==2.0.0\nsame==1.0\n")
    rows = versions.differences(versions.locked(lock), {"torch": "2.14.1", "same": "1.0+cpu", "new-one": "3"})
    assert rows == [("new-one", "-", "3"), ("numpy", "2.0.0", "-"), ("torch", "2.13.0", "2.14.1")]


def test_versions_puts_the_packages_of_the_failing_tracebacks_first():
    log = ("E   ImportError: cannot import name 'X'\n"
           "/venv/lib/python3.11/site-packages/transformers/integrations/hub_kernels.py:104: in <module>\n")
    assert "transformers" in versions.in_tracebacks(log)
    assert versions.in_tracebacks("no traceback here") == set()
