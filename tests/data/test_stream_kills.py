"""kill -9 in the middle of every streamed data stage: no partial output, no process left, and the
rerun gives the uninterrupted run's bytes.

Where test_faults kills at random moments (on the fixture, mostly before a stage's stream has begun),
this kills each stage halfway through its stream, at a point counted in a first, hooked run
(tests/midstream.py): with 4-story batches, after half of the batches it writes or reads.
"""

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.dvc_project import copy_built, files_under, tool_env
from tests.helpers import ROOT
from tests.pipeline.test_faults import remove, stage_commands

MIDSTREAM = ROOT / "tests" / "midstream.py"
WRITES = "librarian.core.io:StoryWriter.write"
READS = "pyarrow.parquet:ParquetFile.iter_batches"
# What each stage does once per batch.
HOOKS = {
    "download": WRITES,
    "subsample": WRITES,
    "clean": WRITES,
    "train_tokenizer": READS,
    "tokenize": "librarian.data.tokens:encode_chunk",
    "chat_data": READS,
}
MIN_STEPS = 4  # fewer and "the middle" of the stream is not one


def hooked_run(project: Path, cmd: str, hook: str, kill_at: int, count_file: Path) -> subprocess.CompletedProcess:
    _, module, *args = cmd.split()
    assert module == "-m", cmd
    return subprocess.run([sys.executable, str(MIDSTREAM), str(count_file), str(kill_at), hook, *args],
                          cwd=project, env=tool_env(), capture_output=True, text=True, timeout=300)


def leftovers(project: Path) -> list[str]:
    """Temporary siblings (`.NAME.xxx.tmp`) anywhere under data/ and metrics/."""
    return [str(p.relative_to(project)) for folder in ("data", "metrics")
            for p in (project / folder).rglob(".*.tmp")]


@pytest.mark.parametrize("stage", list(HOOKS))
def test_kill_9_mid_stream_leaves_no_output_and_the_rerun_gives_the_same_bytes(built_project, tmp_path, stage):
    project = copy_built(built_project, tmp_path / "p")
    cmd, outs = stage_commands(project)[stage]
    whole = {path: files_under(project, path) for path in outs}
    count_file = tmp_path / "count"

    remove(project, outs)
    counted = hooked_run(project, cmd, HOOKS[stage], 0, count_file)
    assert counted.returncode == 0, counted.stderr
    assert all(files_under(project, p) == whole[p] for p in outs), f"{stage}: 4-story batches changed the output"
    steps = int(count_file.read_text())
    assert steps >= MIN_STEPS, f"{stage}: only {steps} batches on the fixture"

    remove(project, outs)
    killed = hooked_run(project, cmd, HOOKS[stage], steps // 2, count_file)
    assert killed.returncode == -9, f"{stage} was not killed mid-stream: {killed.returncode}\n{killed.stderr}"
    for path in outs:
        assert not (project / path).exists(), f"{stage} killed at batch {steps // 2} of {steps} left {path}"
    children = [int(pid) for pid in Path(f"{count_file}.children").read_text().split()]
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"{stage}: child processes {alive} outlived the killed stage"

    rerun = subprocess.run(cmd.replace("python", sys.executable, 1).split(), cwd=project, env=tool_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert all(files_under(project, p) == whole[p] for p in outs), f"{stage}: the rerun after kill -9 differs"
    assert not leftovers(project), f"{stage}: the rerun left {leftovers(project)}"
