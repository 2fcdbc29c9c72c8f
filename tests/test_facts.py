"""Every fact has one home: no module spells out again a list that a registry or core/vocab.py owns.

The check is on literals: a tuple / list / set literal that holds two or more values of one of these
choice lists, anywhere outside the module that defines it, is a stray copy (it will disagree with the
registry the day a value is added). Single values (``mode == "relative"``) are fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hishrst_runtime.core import vocab
from hishrst_runtime.slides.formats import slide_suffixes

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("hishrst_runtime", "hishrst_train", "export", "hishrst", "benchmarks")

#: fact → (its values, the modules allowed to list them).
FACTS: dict[str, tuple[frozenset[str], set[str]]] = {
    "slide suffixes": (frozenset(slide_suffixes()), {"hishrst_runtime/slides/formats.py"}),
    "position modes": (frozenset(vocab.POSITION_MODES), {"hishrst_runtime/core/vocab.py"}),
    "tasks": (frozenset(vocab.TASKS), {"hishrst_runtime/core/vocab.py"}),
    "providers": (frozenset(vocab.PROVIDERS) - {"cpu", "cuda"}, {"hishrst_runtime/core/vocab.py"}),
    "precisions": (frozenset(vocab.PRECISIONS), {"hishrst_runtime/core/vocab.py"}),
    "grid kinds": (frozenset(vocab.GRID_KINDS), {"hishrst_runtime/core/vocab.py"}),
}


def _modules() -> list[Path]:
    return sorted(p for f in FOLDERS for p in (REPO / f).rglob("*.py") if "__pycache__" not in p.parts)


def _literals(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(values) >= 2:
                yield node.lineno, values
        elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
            inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            values = {e.value for e in inner if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(values) >= 2:
                yield node.lineno, values


@pytest.mark.parametrize("fact", list(FACTS))
def test_no_stray_copies(fact: str) -> None:
    values, homes = FACTS[fact]
    bad = []
    for path in _modules():
        rel = path.relative_to(REPO).as_posix()
        if rel in homes:
            continue
        for line, found in _literals(ast.parse(path.read_text(encoding="utf-8"))):
            hit = found & values
            if len(hit) >= 2:
                bad.append(f"{rel}:{line}: {sorted(hit)}")
    assert not bad, f"stray copies of the {fact} (import them from {sorted(homes)[0]}):\n" + "\n".join(bad)


def test_the_vocabulary_is_self_consistent() -> None:
    assert vocab.DEFAULT_POSITION_MODE in vocab.TRANSFERABLE_POSITION_MODES
    assert set(vocab.UM_POSITION_MODES) <= set(vocab.POSITION_MODES)
    assert vocab.DEFAULT_TASK in vocab.TASKS and vocab.DEFAULT_PRECISION in vocab.PRECISIONS
    assert vocab.DEFAULT_GRID in vocab.GRID_KINDS and vocab.DEFAULT_PROVIDER in vocab.PROVIDERS
