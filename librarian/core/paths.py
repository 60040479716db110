"""Where stages may write: inside the project's data/ and metrics/ folders, nowhere else.

dvc.yaml gives every stage its output paths. A `..` in one, or a symlink planted on the way (a
link at data/tokens, or data/ itself linked elsewhere), would carry a write, and the delete
that replacing an output starts with, outside the project. Inputs are only read, so `data.source`
and input paths may point anywhere, through `..` and symlinks alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from librarian.core.errors import LibrarianError

WRITABLE = ("data", "metrics")


def check_output(path: str | Path, root: str | Path) -> None:
    """Refuse an output path that is, or reaches through a symlink to, anywhere outside root/data or root/metrics."""
    root = Path(os.path.abspath(root))
    target = Path(os.path.normpath(os.path.abspath(path)))  # folds `..` the way the OS will not when linked
    if not any(target.is_relative_to(root / top) and target != root / top for top in WRITABLE):
        raise LibrarianError(f"output path {path} is outside the project's data/ and metrics/ folders ({root}); "
                             "stages write only there: keep the output paths dvc.yaml gives them")
    step = root
    for part in target.relative_to(root).parts:
        step = step / part
        if step.is_symlink():
            raise LibrarianError(f"output path {path} goes through the symlink {step.relative_to(root)} -> "
                                 f"{os.readlink(step)}; replace it with a real folder (to keep data on another disk, "
                                 "move the DVC cache there with `dvc cache dir`)")


def check_replaceable(out: Path, foreign: list[str], refusal: str, force: bool = True, earlier: str = "") -> None:
    """Refuse to replace an output holding anything Librarian did not write, and an earlier one without --force.

    `foreign`: what `out` holds that no earlier run of the command wrote. `refusal` and `earlier` are
    the two messages, with {out} and {held} (the first foreign names) filled in; `earlier` only for a
    command with --force, which replaces its own earlier output only when given.
    """
    if foreign:
        held = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise LibrarianError(refusal.format(out=out, held=held))
    if not force:
        raise LibrarianError(earlier.format(out=out))


def recorded_output(path: str | Path) -> str | None:
    """The pipeline output (as dvc.lock names it, e.g. "data/model") that holds `path`, when the
    nearest dvc.lock above it records one: a missing file there is one `dvc checkout` away, not a
    retraining away (DVC deletes a stage's outputs before it runs it, so a failed run leaves them
    missing from the workspace, but whole in the cache)."""
    import yaml

    target = Path(os.path.abspath(path))
    for root in target.parents:
        lock = root / "dvc.lock"
        if lock.is_file():
            break
    else:
        return None
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # a damaged lock: no hint rather than a second error
    wanted = target.relative_to(root)
    for stage in stages.values():
        for out in stage.get("outs", []) if isinstance(stage, dict) else []:
            if wanted.is_relative_to(Path(out["path"])):
                return out["path"]
    return None


def missing_fix(path: str | Path, otherwise: str) -> str:
    """What to tell a user whose `path` is missing: `dvc checkout` when dvc.lock records its output,
    else `otherwise` (the stage that makes it)."""
    out = recorded_output(path)
    if out is None:
        return otherwise
    return (f"dvc.lock records {out}: `dvc checkout {out}` brings back the last one the pipeline made "
            f"(`dvc pull {out}` if this clone's cache lacks it), or {otherwise.removesuffix('.')}")
