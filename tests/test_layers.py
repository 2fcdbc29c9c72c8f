"""Package order and size limits for the whole repository.

Packages, lowest first — a package may import only from those before it, never after, so there is
no cycle: ``hishrst_runtime`` ← ``hishrst_train`` ← ``hishrst_export`` ← ``hishrst`` (the umbrella CLI
and the demo) ← ``benchmarks``. Inside ``hishrst_runtime`` the layers of
``tests/runtime/test_layers.py`` hold as well. No package imports another package's private names
(``_x``) or private modules. Every module of every package stays under :data:`MAX_MODULE_LINES`
and every function under :data:`MAX_FUNCTION_LINES`.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: import name → folder, lowest package first.
PACKAGES: dict[str, Path] = {
    "hishrst_runtime": REPO / "hishrst_runtime",
    "hishrst_train": REPO / "hishrst_train",
    "hishrst_export": REPO / "export",
    "hishrst": REPO / "hishrst",
    "benchmarks": REPO / "benchmarks",
}
ORDER = list(PACKAGES)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: Exceptions, each with its reason in docs/ARCHITECTURE.md ("Size limits"). Empty: there are none.
EXCEPTIONS: dict[str, int] = {}
#: Heavy packages the runtime never imports (it runs where they are not installed).
NOT_IN_RUNTIME = ("torch", "timm", "torchvision", "onnx", "onnxscript", "click_not_here")


def _modules(pkg: str) -> list[Path]:
    return sorted(p for p in PACKAGES[pkg].rglob("*.py") if "__pycache__" not in p.parts)


ALL = [(pkg, p) for pkg in PACKAGES for p in _modules(pkg)]


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _id(item: tuple[str, Path]) -> str:
    return str(item[1].relative_to(REPO))


@pytest.mark.parametrize("item", ALL, ids=_id)
def test_packages_import_downwards_only(item: tuple[str, Path]) -> None:
    pkg, path = item
    rank = ORDER.index(pkg)
    bad = []
    for line, module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
        top = module.split(".")[0]
        if pkg == "hishrst_runtime" and top in NOT_IN_RUNTIME:
            bad.append(f"line {line}: {module} (the runtime never imports {top})")
        if top not in PACKAGES or top == pkg:
            continue
        if ORDER.index(top) > rank:
            bad.append(f"line {line}: {module} ({pkg} may import only {ORDER[:rank] or 'nothing'} of the packages)")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        private += [part for part in module.split(".")[1:] if part.startswith("_") and part != "__init__"]
        if private:
            bad.append(f"line {line}: {module} imports private {private} of another package")
    assert not bad, f"{path.relative_to(REPO)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("item", ALL, ids=_id)
def test_sizes(item: tuple[str, Path]) -> None:
    _, path = item
    rel = str(path.relative_to(REPO))
    text = path.read_text(encoding="utf-8")
    bad = []
    n = len(text.splitlines())
    if n > EXCEPTIONS.get(rel, MAX_MODULE_LINES):
        bad.append(f"{rel}: {n} lines > {MAX_MODULE_LINES}")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            key = f"{rel}::{node.name}"
            if length > EXCEPTIONS.get(key, MAX_FUNCTION_LINES):
                bad.append(f"{key}: {length} lines > {MAX_FUNCTION_LINES}")
    assert not bad, "\n".join(bad)


def test_packaging_lists_every_package() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg.get("package-dir", {})
    found = set()
    for name, folder in PACKAGES.items():
        if name == "benchmarks":
            continue
        for init in folder.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, found - listed
    assert dirs.get("hishrst_export") == "export"
