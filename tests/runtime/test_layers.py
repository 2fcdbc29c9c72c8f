"""The runtime's layers: imports point one way, module and function sizes stay small.

Layers (a module may import from its own layer and those listed for it, nothing else of
``hishrst_runtime``): ``core`` ← ``bundle``, ``slides``, ``output``, ``backends`` ← ``inference`` ←
``jobs`` ← ``cli``. The rule is checked statically on every ``import`` statement (also those inside
functions), so a lazily imported upward dependency fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "hishrst_runtime"

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "bundle": {"core"},
    "slides": {"core"},
    "output": {"core"},
    "backends": {"core"},
    "inference": {"core", "bundle", "slides", "output", "backends"},
    "jobs": {"core", "bundle", "slides", "output", "backends", "inference"},
    "cli": {"core", "bundle", "slides", "output", "backends", "inference", "jobs"},
}
#: Size limits and packaging are checked for every package by tests/test_layers.py.


def _modules() -> list[Path]:
    return sorted(p for p in RUNTIME.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(path: Path) -> str | None:
    rel = path.relative_to(RUNTIME).parts
    return rel[0] if len(rel) > 1 else None


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "hishrst_runtime":  # from hishrst_runtime import core, jobs ...
                out += [(node.lineno, f"hishrst_runtime.{a.name}") for a in node.names]
    return out


def test_every_module_lives_in_a_layer() -> None:
    loose = [p.name for p in _modules() if _layer(p) is None and p.name != "__init__.py"]
    assert not loose, f"modules outside the layers: {loose}"
    layers = {p.name for p in RUNTIME.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert layers == set(ALLOWED), layers ^ set(ALLOWED)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(RUNTIME)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for line, name in _imported(tree):
        parts = name.split(".")
        if parts[0] in ("torch", "timm", "hishrst_train", "hishrst_export", "torchvision"):
            bad.append(f"line {line}: {name} (the runtime never imports training or export code)")
        if parts[0] != "hishrst_runtime" or len(parts) < 2 or layer is None:
            continue
        target = parts[1]
        if target == "__version__" or target == layer:
            continue
        if target not in ALLOWED.get(layer, set()):
            bad.append(f"line {line}: {name} ({layer} may import only {sorted(ALLOWED[layer]) or 'nothing'})")
    assert not bad, f"{path.relative_to(REPO)}:\n" + "\n".join(bad)


def test_click_only_in_cli() -> None:
    """Library code never raises click exceptions; the cli layer maps hishrst errors to click errors."""
    bad = []
    for path in _modules():
        if _layer(path) == "cli":
            continue
        for line, name in _imported(ast.parse(path.read_text(encoding="utf-8"))):
            if name.split(".")[0] == "click":
                bad.append(f"{path.relative_to(REPO)}:{line}")
    assert not bad, bad
