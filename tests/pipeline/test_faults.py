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

import pytest
import yaml

from tests.dvc_project import STAGES, copy_built, dvc, files_under, lock_outputs, set_params, tool_env
from tests.helpers import ROOT

SEED = 20261124
TRIALS_PER_STAGE = 2  # one SIGKILL, one SIGINT, in random order, at random delays


# A stage stopped by Ctrl-C exits 130 (sys.exit). CPython itself ends the process with SIGINT
# instead (-2 here, 130 in a shell, the convention for Ctrl-C) when the KeyboardInterrupt went
# through code it ran with PyRun_* (its _Py_UnhandledKeyboardInterrupt flag, set even if the
# exception is later caught): which of the two happens depends on where the signal lands.
CTRL_C_EXITS = (130, -signal.SIGINT)

def stage_commands(project: Path) -> dict[str, tuple[str, list[str]]]:
    """Each stage's command and the outputs a later stage reads (training curves are logs, not inputs)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        paths = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("outs", []) + stage.get("metrics", [])]
        out[name] = (stage["cmd"], [p for p in paths if not p.startswith(("metrics/train/", "metrics/finetune/"))])
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
    copy_built(built_project, project)
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
                assert proc.returncode == 0 or (proc.returncode in CTRL_C_EXITS and len(said) == 1
                                                and said[0].startswith("error: interrupted")), (proc.returncode, err)
            trials.append((name, sig.name, round(delay, 2), proc.returncode))
        # From whatever the last kill left, DVC finishes the stage (training resumes its state).
        dvc("repro", "--no-run-cache", name, cwd=project)
        assert all(files_under(project, p) == whole[p] for p in outs), f"{name}: rerun after kills differs"
    print(f"\n{len(trials)} kill trials (seed {SEED}):", *trials, sep="\n  ")

    assert lock_outputs(project) == baseline
    assert "up to date" in dvc("status", cwd=project)
    assert len(trials) == TRIALS_PER_STAGE * len(stage_commands(project))  # check_params too
    assert sum(rc != 0 for *_, rc in trials) >= len(STAGES), "most trials should interrupt a running stage"


# A file-size limit (RLIMIT_FSIZE) makes every write past it fail with EFBIG, the way a full disk
# fails with ENOSPC, in the real stage process and in every library it calls. Each limit is below
# the size of the stage's output, so the stage dies in the middle of writing it.
WRITE_LIMITS = {"check_params": 20, "download": 1000, "subsample": 1000, "clean": 1000, "train_tokenizer": 1000, "tokenize": 1000,
                "train": 120_000, "evaluate": 400, "samples": 1000,
                "chat_data": 1000, "chat_tokens": 40, "finetune": 120_000, "evaluate_chat": 400, "chat_samples": 1000}


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the EFBIG error, not the killing signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_every_stage_with_one_line_and_no_output(built_project, tmp_path):
    project = tmp_path / "full"
    copy_built(built_project, project)
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


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export_inputs(folder: Path) -> None:
    """A tiny model and its tokenizer, and a second model (other weights) to export over the first."""
    from librarian.data.tokenizer import file_sha256
    from tests.helpers import tiny_model, tiny_tokenizer

    vocab = tiny_tokenizer(folder / "tokenizer.json").get_vocab_size()
    for seed, name in ((0, "a.safetensors"), (1, "b.safetensors")):
        tiny_model(folder / name, vocab, context_length=16, seed=seed,
                   tokenizer_sha256=file_sha256(folder / "tokenizer.json"))


def test_export_killed_at_random_points_keeps_one_whole_export_and_the_users_folder(tmp_path):
    """`librarian export --force` over an earlier export, killed at random points: the folder is always one
    export, whole (the earlier or the new), after the swap a kill may interrupt is finished (as the next export
    does); a user's folder beside it, which --force refuses to replace, is never touched."""
    pytest.importorskip("transformers")
    from librarian.inference.export import export_hf
    from librarian.core.io import recover_dir
    from tests.helpers import ROOT

    _export_inputs(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    mine = _tree(tmp_path / "mine")

    def export(model: str, out: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "librarian.cli.main", "export", *extra, "--model", model,
                                 "--tokenizer", "tokenizer.json", out], cwd=tmp_path,
                                env={**tool_env(), "PYTHONPATH": str(ROOT)},  # this checkout's code, run from tmp_path
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    export_hf(tmp_path / "a.safetensors", tmp_path / "tokenizer.json", tmp_path / "earlier")
    began = time.monotonic()
    assert export("b.safetensors", "newer").wait(timeout=120) == 0
    duration = time.monotonic() - began
    earlier, newer = _tree(tmp_path / "earlier"), _tree(tmp_path / "newer")
    assert earlier != newer
    rng = random.Random(SEED)
    trials = []
    for sig in rng.sample([signal.SIGKILL, signal.SIGINT], TRIALS_PER_STAGE):
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)
        shutil.copytree(tmp_path / "earlier", tmp_path / "hf")
        delay = rng.uniform(0.25, duration)
        proc = export("b.safetensors", "hf", "--force")
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        recover_dir(tmp_path / "hf")
        assert _tree(tmp_path / "hf") in (earlier, newer), f"killed by {sig.name} after {delay:.2f}s: not one export"
        if sig == signal.SIGINT:  # Ctrl-C: done (0), or the command's "(interrupted)" and 130, never a traceback
            assert proc.returncode in (0, *CTRL_C_EXITS) and "Traceback" not in err, (proc.returncode, err)
        trials.append((sig.name, round(delay, 2), proc.returncode))
    print(f"\nexport kill trials (seed {SEED}):", *trials, sep="\n  ")

    refused = export("b.safetensors", "mine", "--force")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and err.startswith("error: mine is not empty and is not a Librarian export"), err
    assert _tree(tmp_path / "mine") == mine and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert export("b.safetensors", "hf", "--force").wait(timeout=120) == 0
    assert _tree(tmp_path / "hf") == newer


# --- SIGTERM, orphans, leftovers, and two trainers on one state ---------------------------------
#
# SIGTERM is what `timeout`, CI runners, systemd and `docker stop` send. A stage takes it like Ctrl-C:
# temporary files removed, one line, exit 143. To hit every stage in the middle of writing, not before
# or after, the stage runs with os.replace made to wait before it publishes a temporary file: the
# signal then lands while the stage's temporary output is on disk, and what follows is the stage's own.

LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

_PAUSED = """
import os, pathlib, runpy, sys, time
publish = os.replace
def publish_later(src, dst, **kw):
    if str(src).endswith(".tmp") and os.environ["PAUSE_ON"] in pathlib.Path(src).name:
        pathlib.Path(os.environ["PAUSED_AT"]).write_text(str(src))
        time.sleep(120)
    return publish(src, dst, **kw)
os.replace = publish_later
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _temporary_files(project: Path) -> list[Path]:
    return [p for folder in ("data", "metrics", "export") if (project / folder).exists()
            for p in (project / folder).rglob(".*.tmp")]


def _terminate_while_writing(project: Path, argv: list[str], marker: Path, pause_on: str = "") -> tuple[int, str, str]:
    """Run argv (a module and its arguments) with publishing paused (of a temporary file whose name
    holds `pause_on`); SIGTERM it there. (code, stderr, paused at)."""
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, *argv], cwd=project,
                            env={**tool_env(), "PAUSED_AT": str(marker), "PAUSE_ON": pause_on},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"{argv[0]} ended before it published anything: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, marker.read_text()


def _said(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]


def test_sigterm_stops_every_stage_and_export_with_one_line_and_no_temporary_files(built_project, tmp_path):
    project = tmp_path / "term"
    copy_built(built_project, project)
    commands = {name: argv(cmd)[2:] for name, (cmd, _) in stage_commands(project).items()}  # after "python -m"
    commands["librarian export"] = ["librarian.cli.main", "export", "export/hf", "--model", "data/model/model.safetensors",
                                    "--tokenizer", "data/tokenizer.json"]
    outputs = {name: outs for name, (_, outs) in stage_commands(project).items()} | {"librarian export": ["export/hf"]}
    for name, command in commands.items():
        remove(project, outputs[name])
        # Training takes a signal between steps and during its checkpoints only once they are whole
        # (tests/training/test_train.py): here it is stopped while publishing data/model (finetune: data/chat_model).
        pause_on = {"train": ".model.", "finetune": ".chat_model."}.get(name, "")
        code, err, paused_at = _terminate_while_writing(project, command, tmp_path / f"{name}.paused", pause_on)
        said = _said(err)
        assert code == 143 and len(said) == 1 and said[0].startswith("error: terminated (SIGTERM); "), (name, code, err)
        assert "training resumes from its last checkpoint" in said[0]
        assert not _temporary_files(project), f"{name}, stopped at {paused_at}, left {_temporary_files(project)}"
        for path in outputs[name]:
            assert not (project / path).exists(), f"{name} published {path} though stopped before its last write"
        if name != "librarian export":
            for path in outputs[name]:  # put the outputs back for the next stage
                restore = shutil.copytree if (built_project / path).is_dir() else shutil.copy2
                restore(built_project / path, project / path)


@pytest.mark.parametrize("stage,output,leftover", [("tokenize", "data/tokens", "folder"),
                                                   ("train_tokenizer", "data/tokenizer.json", "file")])
def test_the_next_run_removes_temporary_files_a_kill_left(built_project, tmp_path, stage, output, leftover):
    """kill -9 leaves a temporary sibling (`data/.tokens.abc123.tmp`) that no clean-up ran for: the
    next run of the stage removes it. Files the user made beside it, under other names, stay."""
    project = tmp_path / "left"
    copy_built(built_project, project)
    out = project / output
    stale = [out.with_name(f".{out.name}.abc123.tmp"), out.with_name(f".{out.name}.x_9.tmp")]
    for path in stale:
        if leftover == "folder":
            path.mkdir()
            (path / "train.bin").write_bytes(b"\0" * 1000)
        else:
            path.write_text("half a file")
    users = [out.with_name(f".{out.name}.notes"), out.with_name(f"{out.name}.abc123.tmp"),
             out.with_name(f".{out.name}.abc123.tmp.keep"), out.with_name(f".{out.name}.ABC.tmp")]
    for path in users:
        path.write_text("mine")
    cmd, outs = stage_commands(project)[stage]
    remove(project, outs)
    result = subprocess.run(argv(cmd), cwd=project, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale), [p.name for p in stale if p.exists()]
    assert all(p.read_text() == "mine" for p in users)
    assert files_under(project, output) == files_under(built_project, output)


def _stage_processes(parent: int) -> list:
    import psutil

    return psutil.Process(parent).children(recursive=True)


def _gone_within(processes: list, seconds: float) -> list:
    """The processes still running after up to `seconds`."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@LINUX_ONLY
def test_sigterm_to_dvc_repro_during_training_leaves_no_orphan_and_the_next_repro_resumes(built_project, tmp_path):
    """DVC itself dies at once on SIGTERM. Without $SHELL (as in CI) it runs the stage as
    `/bin/sh -c CMD`, and dash forks CMD: the shell outlives DVC and waits for a training that goes on,
    and which the next `dvc repro` would start again beside. The stage must stop with its launcher."""
    project = tmp_path / "orphan"
    copy_built(built_project, project)
    set_params(project, **{"train.max_steps": 300, "train.checkpoint_every": 5})
    env = {k: v for k, v in tool_env().items() if k != "SHELL"}
    state = project / "data" / "train_state" / "state.pt"
    with (tmp_path / "repro.log").open("w") as log:  # not a pipe: an orphan would hold it open
        repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while not state.exists():
            assert repro.poll() is None and time.monotonic() < deadline, (tmp_path / "repro.log").read_text()
            time.sleep(0.02)
        stage = _stage_processes(repro.pid)
        assert any(Path(p.cmdline()[0]).name == "sh" for p in stage), [p.cmdline() for p in stage]  # the fork case
        repro.send_signal(signal.SIGTERM)
        repro.wait(timeout=30)
        try:
            left = _gone_within(stage, 10)
            assert not left, f"left running after DVC died: {[p.cmdline() for p in left]}"
        finally:
            for p in _gone_within(stage, 0):
                p.kill()
    # Stopped, not finished: an orphan quick enough to be done by now would have published the model.
    assert not (project / "data" / "model").exists() and state.exists()
    said = _said((tmp_path / "repro.log").read_text())
    assert len(said) == 1 and said[0].startswith("error: terminated (SIGTERM)"), said
    assert not (project / "data" / ".train_state.lock").exists()

    resumed = dvc("repro", cwd=project)
    assert "train: resuming at epoch 1, step" in resumed
    assert "up to date" in dvc("status", cwd=project)


def _run_python(code: str, **kw) -> subprocess.Popen:
    from tests.helpers import ROOT

    return subprocess.Popen([sys.executable, "-c", code], env={**tool_env(), "PYTHONPATH": str(ROOT)}, text=True, **kw)


_ARMED = """
import sys, time
from librarian.core import process
try:
    process.while_running()
    print("armed", flush=True)
    time.sleep(60)
except process.Terminated:
    print("terminated", flush=True)
    sys.exit(143)
"""


@LINUX_ONLY
def test_a_stage_gets_sigterm_when_its_shell_dies(tmp_path):
    """The parent-death signal: `sh -c` (dash forks) killed, as by a SIGTERM to the whole process group."""
    import shlex

    out = tmp_path / "out.txt"
    shell = subprocess.Popen(["/bin/sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(_ARMED)} > {out}"],
                             env={**tool_env(), "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while "armed" not in (out.read_text() if out.exists() else ""):
        assert shell.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    (child,) = _stage_processes(shell.pid)
    shell.send_signal(signal.SIGTERM)
    shell.wait(timeout=10)
    try:
        assert not _gone_within([child], 10), "the stage outlived its shell"
    finally:
        for p in _gone_within([child], 0):
            p.kill()
    assert out.read_text().split() == ["armed", "terminated"]


@LINUX_ONLY
def test_a_stage_whose_parent_died_before_it_could_watch_stops(tmp_path):
    """The race: the parent is gone before the parent-death signal is armed, so none will ever come."""
    child_code = ("from librarian.core import process\n"  # notes its parent
                  "print('noted', flush=True)\n"
                  "import time; time.sleep(1.5)\n"  # the parent exits meanwhile
                  + _ARMED.replace("from librarian.core import process\n", ""))
    out = tmp_path / "out.txt"
    launcher = _run_python("import os, pathlib, subprocess, sys, time\n"
                           f"out = pathlib.Path({str(out)!r})\n"
                           f"subprocess.Popen([sys.executable, '-c', {child_code!r}], stdout=out.open('w'))\n"
                           "while 'noted' not in out.read_text(): time.sleep(0.01)\n"
                           "os._exit(0)")
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 30
    while "terminated" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.05)
    assert out.read_text().split() == ["noted", "terminated"]


def test_a_second_trainer_on_the_same_state_is_refused_naming_the_first(built_project, tmp_path):
    project = tmp_path / "two"
    copy_built(built_project, project)
    set_params(project, **{"train.max_steps": 2000, "train.max_epochs": 10, "train.checkpoint_every": 5})
    cmd, outs = stage_commands(project)["train"]
    remove(project, outs)
    state = project / "data" / "train_state"
    first = start(project, cmd)
    try:
        deadline = time.monotonic() + 120
        while not (state / "state.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # holds still, so that any change to its state is the second's doing
        before = files_under(project, "data/train_state")
        data_before = sorted(p.name for p in (project / "data").iterdir())

        second = subprocess.run(argv(cmd), cwd=project, env=tool_env(), capture_output=True, text=True, timeout=300)
        said = _said(second.stderr)
        assert second.returncode == 1 and len(said) == 1, second.stderr
        assert said[0] == (f"error: data/train_state is in use by another training run (PID {first.pid}); "
                           f"wait for it to finish, or stop it (`kill {first.pid}`) and rerun"), said[0]
        assert files_under(project, "data/train_state") == before
        assert sorted(p.name for p in (project / "data").iterdir()) == data_before
        assert not (project / "data" / "model").exists()

        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)  # and the first stops as any stage does: one line, 143
        _, err = first.communicate(timeout=60)
        assert first.returncode == 143 and _said(err)[0].startswith("error: terminated (SIGTERM)"), err
    finally:
        if first.poll() is None:
            first.kill()
    assert not (project / "data" / ".train_state.lock").exists()


def test_ctrl_c_while_a_stage_imports_torch_is_one_line_and_130(built_project, tmp_path):
    """A Ctrl-C anywhere in the second or two a stage spends importing (torch's C++ runtime included)
    gives one line and exit 130: never a C++ abort (SIGABRT, "terminate called ...") from unwinding
    a half-done import.

    Each Ctrl-C is sent a delay after the stage says it can take one: `-X importtime` reports the
    `stages` package imported, so its start-up handlers are in place (stages/__init__.py). A fixed
    delay from the process's start would land in Python's own start-up on a loaded machine, before
    any code of ours runs. The delays then sweep the imports that follow, torch's among them.
    """
    project = tmp_path / "ctrl-c"
    copy_built(built_project, project)
    python, *rest = argv(stage_commands(project)["train"][0])
    outcomes = []
    for delay in [0.1 * i for i in range(16)]:
        proc = subprocess.Popen([python, "-X", "importtime", *rest], cwd=project, env=tool_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:  # the sign: the stages package has finished importing
            seen.append(line)
            if line.rstrip().endswith("| stages"):
                break
        assert proc.poll() is None, "".join(seen)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        said = [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line
                or "terminate called" in line]
        outcomes.append((round(delay, 2), proc.returncode))
        assert proc.returncode in CTRL_C_EXITS and len(said) == 1 and said[0].startswith("error: interrupted"), \
            (delay, proc.returncode, err)
    print("\n(delay, exit code):", outcomes)
