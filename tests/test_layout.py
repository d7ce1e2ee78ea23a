"""The layout's import rules (design page): utils/ is a leaf, models/ and data/ import only utils/,
engine/ may import all three, and no package imports a command-line script."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models", "data", "engine")
SCRIPTS = ("train", "val", "detect", "export", "benchmarks", "hubconf")
ALLOWED = {
    "utils": {"utils"},
    "models": {"utils", "models"},
    "data": {"utils", "data"},
    "engine": {"utils", "models", "data", "engine"},
}


def imported_roots(source: str, module: str) -> set[str]:
    """Top-level names of our own modules that `source` (the module `module`, e.g.
    'models.backbones.base') imports anywhere, also inside functions; relative imports are resolved."""
    ours = set(PACKAGES) | set(SCRIPTS)
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".")[: -node.level]
            roots.add((base + (node.module or "").split("."))[0] if base else "")
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots & ours


def wrong_arrows(root: Path = ROOT) -> list[str]:
    """'file -> package' for every import that breaks the rules."""
    problems = []
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            module = ".".join(file.relative_to(root).with_suffix("").parts)
            for target in sorted(imported_roots(file.read_text(), module) - ALLOWED[package]):
                problems.append(f"{file.relative_to(root)} -> {target}")
    return problems


def test_imports_point_one_way():
    assert wrong_arrows() == []


@pytest.mark.parametrize("package, line, target", [
    ("utils", "from models.yolo import DetectionModel", "models"),
    ("utils", "def f():\n    from engine.checkpoint import load_checkpoint\n", "engine"),
    ("models", "import data.loaders", "data"),
    ("data", "from engine import trainer", "engine"),
    ("engine", "import detect", "detect"),
])
def test_a_wrong_arrow_is_caught(tmp_path, package, line, target):
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / package / "bad.py").write_text(line)
    assert wrong_arrows(tmp_path) == [f"{package}/bad.py -> {target}"]


def test_relative_imports_are_resolved():
    assert imported_roots("from .base import Backbone\n", "models.backbones.fastvit") == {"models"}
    assert imported_roots("from ..data import loaders\n", "engine.sub.module") == {"engine"}
    assert imported_roots("from .. import data\n", "engine.trainer") == set()  # beyond the top: no package
