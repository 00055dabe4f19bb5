"""The package's import graph (every import, function-local ones included) is acyclic, the
extension loader is a leaf, and the torch reference depends only on torch-level helpers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "me_kernels"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules of the package it imports, top-level external packages it imports)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    inner, outer = set(), set()

    def add_package_module(name: str) -> None:
        inner.add(name if name in MODULES else "__init__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    add_package_module(parts[1] if len(parts) > 1 else "__init__")
                else:
                    outer.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != PACKAGE:
                    outer.add(parts[0])
                    continue
                base = parts[1:]
            else:
                assert node.level == 1, f"{module}: imports from outside the package by a relative path"
                base = node.module.split(".") if node.module else []
            if base:
                add_package_module(base[0])
            else:  # `from . import x`: x is a submodule or a name of the package's __init__
                for alias in node.names:
                    add_package_module(alias.name)
    inner.discard(module)
    return inner, outer


GRAPH = {m: _imports(m)[0] for m in MODULES}


def test_the_graph_is_read():
    assert {"reference", "sampling", "_ops", "_extension"} <= set(MODULES)
    assert "_rows" in GRAPH["sampling"] and "_rows" in GRAPH["mixture"]
    assert GRAPH["__init__"] >= {"sampling", "mixture", "selection", "grouped", "reference"}


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_import_graph_is_acyclic():
    assert_acyclic(GRAPH)


def test_extension_loader_is_a_leaf():
    assert GRAPH["_extension"] == set()


@pytest.mark.parametrize("module", ["reference", "_philox"])
def test_reference_is_plain_torch(module):
    inner, outer = _imports(module)
    assert inner <= {"_philox"}, inner  # no Triton, no compiled extension, no kernels
    assert outer <= {"__future__", "torch", "math", "numbers", "typing"}, outer


def test_no_module_imports_the_package_root():
    offenders = [m for m, deps in GRAPH.items() if "__init__" in deps and m != "__init__"]
    assert not offenders, offenders


# ----------------------------------------------------------------------------- me_runtime
RUNTIME_ROOT = Path(__file__).resolve().parents[1] / "me_runtime"


def _runtime_module_name(path: Path) -> str:
    parts = ["me_runtime", *path.relative_to(RUNTIME_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _runtime_graph() -> dict[str, set[str]]:
    """me_runtime's modules (subpackages included) -> the me_runtime modules they import
    (function-local imports included; `from .x import y` counts as importing .x)."""
    files = {_runtime_module_name(p): p for p in RUNTIME_ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    deps.add(target)
        graph[name] = deps
    return graph


def test_runtime_import_graph_is_acyclic():
    graph = _runtime_graph()
    assert {"me_runtime.ensemble", "me_runtime.decode", "me_runtime.stacked_engine", "me_runtime.demo.scores"} <= set(graph)
    assert "me_runtime.decode" in graph["me_runtime.hf_engine"]
    assert_acyclic(graph)



def _importers(matches, but: str | None = None) -> set[str]:
    """Files of the packages (function-local imports included) with an import whose module or
    name `matches`, except the file named `but`."""
    found = set()
    for path in sorted(list(RUNTIME_ROOT.rglob("*.py")) + list(ROOT.rglob("*.py"))):
        if path.name == but:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            if any(matches(n) for n in names):
                found.add(str(path.relative_to(ROOT.parent)))
    return found

def test_only_the_harness_imports_lm_eval():
    """lm-eval is an optional extra: no module but me_runtime.harness imports it (function-local
    imports included), and nothing in the package imports the harness."""
    assert _importers(lambda n: n.split(".")[0] == "lm_eval") == {"me_runtime/harness.py"}
    assert _importers(lambda n: n.endswith("harness"), but="harness.py") == set()


def test_harness_without_lm_eval_says_how_to_install_it():
    import subprocess
    import sys

    # lm_eval hidden (a None entry in sys.modules makes its import fail), in a fresh interpreter
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import me_runtime\n"
        "try:\n"
        "    import me_runtime.harness\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT.parent))
    assert 'IMPORT-ERROR:' in out.stdout and 'pip install ".[eval]"' in out.stdout, out.stdout + out.stderr


def test_only_ray_placement_imports_ray():
    """ray is an optional extra: only me_runtime/ray_placement.py imports it (function-local
    imports included), and only Ensemble.from_pretrained(placement="ray") imports that module."""
    assert _importers(lambda n: n.split(".")[0] == "ray") == {"me_runtime/ray_placement.py"}
    assert _importers(lambda n: n.endswith("ray_placement"), but="ray_placement.py") == {"me_runtime/ensemble.py"}


def test_import_me_runtime_imports_neither_ray_nor_accelerate():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import me_runtime, me_runtime.ensemble, me_runtime.cli\n"
        "print('LOADED:', sorted(m for m in ('ray', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT.parent))
    assert "LOADED: []" in out.stdout, out.stdout + out.stderr


def test_placement_ray_without_ray_says_how_to_install_it():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from me_runtime import Ensemble\n"
        "try:\n"
        "    Ensemble.from_pretrained(['unused'], placement='ray')\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT.parent))
    assert 'IMPORT-ERROR:' in out.stdout and 'pip install ".[ray]"' in out.stdout, out.stdout + out.stderr
