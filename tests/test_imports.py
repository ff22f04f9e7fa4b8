"""Every compemb module imports first in a fresh interpreter: no import cycle depends on the order."""

import subprocess
import sys
from pathlib import Path

FRESH_IMPORTS = """
import importlib, importlib.util, pkgutil, sys
import torch  # loaded once; every compemb module below is imported from nothing
import compemb
names = sorted(m.name for m in pkgutil.walk_packages(compemb.__path__, "compemb."))
if importlib.util.find_spec("torchrec") is None:  # an optional extra: its adapter cannot import without it
    names.remove("compemb.integrations.torchrec")
for name in names:
    for key in [k for k in sys.modules if k == "compemb" or k.startswith("compemb.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as error:
        print(f"FAILED {name}: {type(error).__name__}: {error}")
print(len(names), "modules")
"""


def test_every_module_imports_first_in_a_fresh_process():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "FAILED" not in done.stdout, done.stdout
    assert int(done.stdout.split()[-2]) > 30  # the walk found the package's modules


def _import_graph(root: Path) -> dict[str, set[str]]:
    """compemb's modules and the compemb modules each imports, at any level (inside functions and TYPE_CHECKING
    too): ``from pkg import name`` counts as ``pkg.name`` where that is a module."""
    import ast

    modules = {}
    for path in (root / "compemb").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compemb"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    edges[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name.startswith("compemb"))
    return {name: {t for t in targets if t in modules} for name, targets in edges.items()}


def test_no_module_imports_one_that_imports_it_back():
    """No import circle, lazy or not (issue 24: embeddings/base.py and table_batch.py imported each other)."""
    edges = _import_graph(Path(__file__).resolve().parents[1])
    assert "compemb.table_batch" in edges["compemb.embeddings.base"]  # the walk sees TYPE_CHECKING imports too
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path + [module, target]
            if target not in state and (found := cycle_from(target, path + [module])):
                return found
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            assert (found := cycle_from(module, [])) is None, " -> ".join(found)


def test_the_package_says_its_type_hints_are_for_type_checkers():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    assert (root / "compemb" / "py.typed").is_file()
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["compemb"]  # shipped in the wheel
