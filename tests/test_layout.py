"""The package's layers (docs/architecture.md) hold: imports point downwards only, the loss layer
loads neither transformers nor training code, no module is too long to read, and the module
paths of the earlier flat layout still import (as the very same modules)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import rlhf_fast

PACKAGE = pathlib.Path(rlhf_fast.__file__).parent
# each layer may import only those before it
LAYERS = ("backends", "loss", "monitor", "training", "casestudy", "integrations")


def _imports(path: pathlib.Path):
    """Absolute module names imported by a file (relative imports resolved)."""
    parts = ("rlhf_fast",) + path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            yield module
            for alias in node.names:  # ``from . import x`` imports a module x
                yield f"{module}.{alias.name}"


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rlhf_fast" and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_lower_layers(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in _imports(path):
            target = _layer(module)
            if target is not None and target not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_the_case_study_uses_only_the_public_api():
    """rlhf_fast.casestudy imports the package's top level and the training layer's exports, nothing deeper."""
    import rlhf_fast.training as training

    wrong = []
    for path in sorted((PACKAGE / "casestudy").rglob("*.py")):
        for module in _imports(path):
            if not module.startswith("rlhf_fast") or module.startswith("rlhf_fast.casestudy"):
                continue
            top, _, name = module.partition("rlhf_fast.")[2].partition(".")
            public = module == "rlhf_fast" or (module.count(".") == 1 and hasattr(rlhf_fast, top)) or (
                top == "training" and (not name or hasattr(training, name)))
            if not public:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def _module_name(path: pathlib.Path) -> str:
    parts = ("rlhf_fast",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if path.name == "__init__.py" else parts)


def _package_files():
    """Every module of the package, ``rlhf_fast.kernels`` (a link to kernels/) included."""
    return sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE / "kernels").glob("*.py"))


def import_graph():
    """Module → the package's modules it imports, at module level or inside a function.

    ``from package import name`` counts as importing ``package.name`` when that is a module, else ``package``;
    importing a submodule is not counted as importing the packages above it (Python runs those first anyway).
    """
    files = {_module_name(path): path for path in _package_files()}
    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                source = ".".join(part for part in (base, node.module) if part)
                names = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            else:
                continue
            targets.update(name for name in names if name in files and name != module)
        graph[module] = targets
    return graph


def import_cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_import_cycles_are_found():
    """The cycle finder on a made-up graph: a → b → c → a is one cycle, d → a is not part of it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_graph()["rlhf_fast.loss.functional"] >= {"rlhf_fast.loss.inputs", "rlhf_fast.backends"}


def test_no_import_cycles():
    """No module of the package imports, at any depth, a module that imports it back."""
    cycles = import_cycles(import_graph())
    assert not cycles, cycles


REPO = pathlib.Path(__file__).resolve().parent.parent


def test_no_module_is_over_500_lines():
    """In the package, the Triton source (kernels/) and the benchmarks and their tools (benchmarks/)."""
    files = {str(p.relative_to(PACKAGE.parent)): p for p in PACKAGE.rglob("*.py")}
    for folder in ("kernels", "benchmarks"):
        files.update({f"{folder}/{p.name}": p for p in (REPO / folder).glob("*.py")})
    assert {"kernels/ppo_loss.py", "benchmarks/static_roofline.py", "rlhf_fast/loss/functional.py"} <= set(files)
    long = {name: n for name, p in files.items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_loss_layer_is_lean():
    code = (
        "import sys\n"
        "import rlhf_fast.loss\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'triton')\n"
        "       or m.startswith(('rlhf_fast.training', 'rlhf_fast.casestudy'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_package_exports_the_loss_layer():
    """The public names are listed once, in rlhf_fast.loss.__all__; the package exports exactly those, the same
    objects, and ``from rlhf_fast import *`` gives them."""
    import rlhf_fast.loss as loss

    assert rlhf_fast.__all__ == loss.__all__
    assert {"ppo_loss", "fused_linear_ppo_loss", "logprobs_ppo_loss", "logprobs", "fused_linear_logprobs",
            "PPOLoss", "PPOLossOutput", "LossOptions", "KL_ESTIMATORS", "LOSS_AGGREGATIONS",
            "POLICY_LOSSES"} <= set(rlhf_fast.__all__)
    assert all(getattr(rlhf_fast, name) is getattr(loss, name) for name in loss.__all__)
    namespace = {}
    exec("from rlhf_fast import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(loss.__all__)


@pytest.mark.parametrize("old, new", sorted(rlhf_fast._MOVED_MODULES.items()))
def test_old_module_paths_still_import(old, new):
    if new == "backends.triton":
        pytest.importorskip("triton")
    if new == "backends.cpp" and rlhf_fast.backends.load_ops("cpp")[0] is None:
        pytest.skip("the C++ extension is not built")
    assert importlib.import_module(f"rlhf_fast.{old}") is importlib.import_module(f"rlhf_fast.{new}")
