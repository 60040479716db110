"""The package's layers: imports point down only.

    cli  >  evaluation  >  inference | training  >  model  >  data  >  core

A module may import its own folder and any folder below it, never one above it, and inference and
training never import each other. evaluation sits above inference because scoring a chat model
decodes with it (evaluate_chat, samples). The walk reads every import statement, lazy ones inside
functions included, so a cycle cannot hide in a function body.
"""

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

LAYERS = {"core": 0, "data": 1, "model": 2, "training": 3, "inference": 3, "evaluation": 4, "cli": 5}
PACKAGE = ROOT / "librarian"


def imported_packages(path: Path) -> set[str]:
    """The librarian folders (core, data, ...) that `path` imports from, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("librarian."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "librarian":
            found |= {alias.name for alias in node.names if alias.name in LAYERS}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("librarian.")}
    return found


def violations(path: Path) -> list[str]:
    own = path.relative_to(PACKAGE).parts[0]
    return sorted(f"{own} imports {other}" for other in imported_packages(path) - {own}
                  if LAYERS[other] >= LAYERS[own])


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def test_every_module_sits_in_a_task_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a task folder: {loose}"
    assert {p.parent.name for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    assert not violations(path), f"{path.relative_to(ROOT)}: {violations(path)}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The check can fail: a data module that imports the model layer, lazily, is caught."""
    module = PACKAGE / "data" / "probe.py"
    fake = tmp_path / "probe.py"
    fake.write_text("def f():\n    from librarian.model.gpt import GPT\n    import librarian.training.train\n")
    # violations() reads the folder from the path's place in the package: give it the data folder's
    assert imported_packages(fake) == {"model", "training"}
    assert sorted(o for o in imported_packages(fake) if LAYERS[o] >= LAYERS[module.parent.name]) == ["model", "training"]
