"""dvc.yaml's deps cannot drift from the code: every librarian module a stage script imports,
directly or through other modules (lazy imports inside functions included), is listed as a dep of
that stage, or is in NOT_DEPS below. Otherwise editing it would change the stage's output without
DVC rerunning the stage."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

# Modules that check, report or manage the process but never shape an output's bytes. Listing them
# would rerun the whole pipeline (hub download included) after every edit of an error message.
NOT_DEPS = {
    "librarian/core/config.py",    # validates params.yaml; the values themselves are deps (params:)
    "librarian/core/errors.py",    # the exception type of one-line errors
    "librarian/core/paths.py",     # refuses output paths outside data/ and metrics/
    "librarian/core/process.py",   # signals, parent death, the train-state lock
    "librarian/core/stage.py",     # argument parsing and error reporting of stage scripts
    "librarian/core/progress.py",  # the progress bar on stderr
}
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def librarian_imports(path: Path) -> set[str]:
    """librarian/**/*.py files that `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "librarian":
            base = node.module.replace(".", "/")
            # `from librarian.data import tokens` names a module; `from librarian.data.tokens import EOT` a name in one
            found |= {f"{base}/{alias.name}.py" for alias in node.names} | {f"{base}.py"}
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names if a.name.startswith("librarian.")}
    return {module for module in found if (ROOT / module).is_file()}


def imported_modules(script: str) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for module in librarian_imports(ROOT / todo.pop()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_the_walk_finds_lazy_and_transitive_imports():
    # train imports the lock from process.py inside a function, and environment.py through train.py.
    assert {"librarian/core/process.py", "librarian/core/environment.py", "librarian/model/gpt.py"} <= imported_modules("stages/train.py")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_module_is_a_dep(stage):
    script = f"stages/{stage}.py"
    deps = set(STAGES[stage]["deps"])
    assert script in deps
    missing = sorted(imported_modules(script) - deps - NOT_DEPS)
    assert not missing, f"dvc.yaml stage {stage} imports {missing} but does not list them as deps"
    unused = sorted(d for d in deps if d.startswith("librarian/") and d not in imported_modules(script))
    assert not unused, f"dvc.yaml stage {stage} lists {unused}, which it never imports"
