"""Faults: every stage killed (SIGKILL or SIGINT) at random points, then `dvc repro` completes.

The harness runs each stage's own command, as DVC would, on the tiny fixture project and kills it
after a random delay within that stage's measured run time. After every kill, each output the next
stage reads is either absent or whole (byte-equal to the uninterrupted run): never half-written.
Then `dvc repro` rebuilds what is missing, resuming training from its saved state, and every
artifact in dvc.lock has the uninterrupted run's hash.
"""

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.dvc_project import STAGES, dvc, files_under, lock_outputs, set_params, tool_env

SEED = 20261124
TRIALS_PER_STAGE = 2  # one SIGKILL, one SIGINT, in random order, at random delays


def stage_commands(project: Path) -> dict[str, tuple[str, list[str]]]:
    """Each stage's command and the outputs a later stage reads (training curves are logs, not inputs)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        paths = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("outs", []) + stage.get("metrics", [])]
        out[name] = (stage["cmd"], [p for p in paths if not p.startswith("metrics/train/")])
    return out


def remove(project: Path, paths: list[str]) -> None:
    """What DVC does before running a stage: its outputs go first."""
    for path in paths:
        target = project / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def argv(cmd: str) -> list[str]:
    """A dvc.yaml command line, run with this venv's python."""
    return cmd.replace("python", sys.executable, 1).split()


def start(project: Path, cmd: str) -> subprocess.Popen:
    return subprocess.Popen(argv(cmd), cwd=project, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_every_stage_survives_kills_at_random_points(built_project, tmp_path):
    project = tmp_path / "faults"
    shutil.copytree(built_project, project, symlinks=True)
    baseline = lock_outputs(built_project)
    whole = {p: files_under(built_project, p) for _, outs in stage_commands(project).values() for p in outs}
    # Checkpoints within the epoch, so a kill during training leaves a state to resume from. The
    # param does not change the result, which the final hash comparison checks too.
    set_params(project, **{"train.checkpoint_every": 2})
    rng = random.Random(SEED)
    trials = []
    for name, (cmd, outs) in stage_commands(project).items():
        remove(project, outs)
        began = time.monotonic()
        _, err = start(project, cmd).communicate(timeout=300)
        assert not err.startswith("error:") and (project / outs[0]).exists(), f"{name} failed uninterrupted: {err}"
        duration = time.monotonic() - began
        assert all(files_under(project, p) == whole[p] for p in outs), f"{name}: not the baseline's bytes"
        for sig in rng.sample([signal.SIGKILL, signal.SIGINT], TRIALS_PER_STAGE):
            remove(project, outs)
            delay = rng.uniform(0.25, duration)  # from 0.25 s: past interpreter start-up
            proc = start(project, cmd)
            time.sleep(delay)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            for path in outs:
                assert not (project / path).exists() or files_under(project, path) == whole[path], \
                    f"{name} killed by {sig.name} after {delay:.2f}s left a partial {path}"
            if sig == signal.SIGINT:  # Ctrl-C: done (0) or one error line and 130, never a traceback
                said = [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]
                assert proc.returncode == 0 or (proc.returncode == 130 and len(said) == 1
                                                and said[0].startswith("error: interrupted")), (proc.returncode, err)
            trials.append((name, sig.name, round(delay, 2), proc.returncode))
        # From whatever the last kill left, DVC finishes the stage (training resumes its state).
        dvc("repro", "--no-run-cache", name, cwd=project)
        assert all(files_under(project, p) == whole[p] for p in outs), f"{name}: rerun after kills differs"
    print(f"\n{len(trials)} kill trials (seed {SEED}):", *trials, sep="\n  ")

    assert lock_outputs(project) == baseline
    assert "up to date" in dvc("status", cwd=project)
    assert len(trials) == TRIALS_PER_STAGE * len(STAGES)
    assert sum(rc != 0 for *_, rc in trials) >= len(STAGES), "most trials should interrupt a running stage"


# A file-size limit (RLIMIT_FSIZE) makes every write past it fail with EFBIG, the way a full disk
# fails with ENOSPC, in the real stage process and in every library it calls. Each limit is below
# the size of the stage's output, so the stage dies in the middle of writing it.
WRITE_LIMITS = {"download": 1000, "subsample": 1000, "clean": 1000, "train_tokenizer": 1000, "tokenize": 1000,
                "train": 120_000, "evaluate": 400, "samples": 1000}


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the EFBIG error, not the killing signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_every_stage_with_one_line_and_no_output(built_project, tmp_path):
    project = tmp_path / "full"
    shutil.copytree(built_project, project, symlinks=True)
    dvc("status", cwd=project)  # DVC's own state database (dvclive opens it) exists before the disk fills
    for name, (cmd, outs) in stage_commands(project).items():
        remove(project, outs)
        result = subprocess.run(argv(cmd), cwd=project, env=tool_env(),
                                capture_output=True, text=True, preexec_fn=_limit_file_size(WRITE_LIMITS[name]))
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
        assert result.returncode == 1 and len(lines) == 1, (name, result.stderr)
        assert re.fullmatch(r"error: no space left on the device \(or a file-size limit\) while writing "
                            r"(data|metrics)/[\w./]+; free some disk space and rerun", lines[0]), lines[0]
        for path in outs:
            target = project / path
            assert not target.exists(), f"{name} left {path} behind"
        leftovers = [p for folder in ("data", "metrics") for p in (project / folder).rglob(".*.tmp")]
        assert not leftovers, f"{name} left temporary files behind: {leftovers}"
        print(f"\n{name}: {lines[0]}", end="")
        for path in outs:  # put the outputs back for the next stage
            restore = shutil.copytree if (built_project / path).is_dir() else shutil.copy2
            restore(built_project / path, project / path)
