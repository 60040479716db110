"""Benchmark the data stages on one worker against every core: clean (worker processes), tokenize
(the tokenizer's thread pool), in the same run, on one corpus, with their outputs checked identical.

    . .venv/bin/activate
    nice -n 19 python benchmarks/data_scale.py --sizes 150000 --stages clean,tokenize --workdir /tmp/ds-par --keep
    nice -n 19 python benchmarks/data_parallel.py /tmp/ds-par/size_150000
    nice -n 19 python benchmarks/data_parallel.py /tmp/ds-par/size_150000 --repeat 3 --clean-sizes 5000,10000,20000,40000 --train-tokenizer

PROJECT is a project folder as data_scale.py --keep leaves it (params.yaml, data/subsample,
data/clean, data/tokenizer.json, data/tokens). Each run is the stage's own main in a process of its
own (cwd = PROJECT, PYTHONPATH = the repo), writing under PROJECT/data/par-* and metrics/par-*
(deleted after):
  * clean, all cores: `python -m stages.clean`, as DVC runs it (workers: one per core);
  * clean, 1 worker: the same main with librarian.data.clean.available_cores made 1 (one process);
  * tokenize, all cores / 1 thread: `python -m stages.tokenize`, RAYON_NUM_THREADS unset / 1.
The two settings alternate, --repeat times each, so that a change in the machine's load hits both.
Per run: wall seconds; CPU seconds of the stage and its workers (user + system); the CPU seconds
every other process took meanwhile (/proc/stat's busy time less ours: the machine is shared, and a
run that others slowed down says so); peak RSS of the process tree, polled. The ratio is the median
1-worker wall time over the median all-cores one.

Checks, for every run: its files are byte-identical (sha256) to the project's own data/clean,
metrics/clean.json and data/tokens, which data_scale.py made (so, with the code of that time).

--clean-sizes N,...: the threshold (librarian.data.clean.PARALLEL_MIN_STORIES): the first N train stories
alone, cleaned on 1 worker and on every core, the workers forced whatever the size.
--train-tokenizer: the stage (streaming batches) against the whole-list read it replaced: peak RSS,
wall seconds, the same tokenizer.json bytes.
Ctrl-C (or SIGTERM) stops the running stage; no process outlives the script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import busy_cpu_s, cpu_name, run_watched, stopping_on_interrupt  # noqa: E402  (benchmarks/common.py)
from librarian.data.clean import clean_workers  # noqa: E402
from librarian.data.parallel import available_cores  # noqa: E402

# A stage's main with module attributes set first: {"module": {"name": value}}; a value for
# available_cores becomes a function returning it.
DRIVER = """
import importlib, json, sys
stage, overrides = sys.argv[1], json.loads(sys.argv[2])
for module, values in overrides.items():
    module = importlib.import_module(module)
    for name, value in values.items():
        setattr(module, name, (lambda v=value: v) if name == "available_cores" else value)
sys.argv = [stage, *sys.argv[3:]]
importlib.import_module(stage).main(sys.argv[1:])
"""
# The train_tokenizer stage as it was: the whole train split read into a list first.
WHOLE_LIST_TRAIN_TOKENIZER = """
import sys
from librarian.core.config import load_params
from librarian.core.io import read_stories
from librarian.data.tokenizer import save_tokenizer, train_tokenizer
train, out, params = sys.argv[1], sys.argv[2], load_params(sys.argv[3])
stories = read_stories(train)
save_tokenizer(train_tokenizer(stories, params.tokenizer, n_stories=len(stories)), out)
"""

def busy_processes(interval: float = 1.0) -> str:
    """What else is running, as top would show it: the processes above 5 % of a core over `interval`."""
    procs = list(psutil.process_iter(["name", "nice"]))
    for proc in procs:
        try:
            proc.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    busy = []
    for proc in procs:
        try:
            percent = proc.cpu_percent(None)
        except psutil.Error:
            continue
        if percent > 5 and proc.pid != os.getpid():
            busy.append(f"{proc.info['name']} (pid {proc.pid}, nice {proc.info['nice']}) {percent:.0f}%")
    return ", ".join(busy)


def our_cpu_s() -> float:
    """This script's CPU seconds and its reaped children's (each with the workers it reaped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run a command to its end: wall and CPU seconds, others' CPU seconds meanwhile, peak RSS (MiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cpu0, ours0, busy0 = children_cpu_s(), our_cpu_s(), busy_cpu_s()
    proc, wall, peak = run_watched(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, code = proc.stdout.read(), proc.returncode
    if code != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... failed (exit {code}):\n{output[-2000:]}")
    others = busy_cpu_s() - busy0 - (our_cpu_s() - ours0)
    return {"wall_s": wall, "cpu_s": children_cpu_s() - cpu0, "others_cpu_s": max(others, 0.0), "peak_mib": peak / 2**20}


def stage_command(stage: str, overrides: dict | None, args: list[str]) -> list[str]:
    if overrides is None:
        return [sys.executable, "-m", stage, *args]
    return [sys.executable, "-c", DRIVER, stage, json.dumps(overrides), *args]


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file under the paths, by name relative to its own root path."""
    out = {}
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            out[str(path.relative_to(root.parent)).replace(root.name, "*", 1)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# --- the comparisons ------------------------------------------------------------------------------


def clean_settings(project: Path, force: bool) -> dict[str, dict | None]:
    """1 worker against every core: forced whatever the size, or as the stage chooses."""
    one = {"librarian.data.clean": {"available_cores": 1}}
    if force:
        return {"1 worker": one, f"{available_cores()} workers": {"librarian.data.clean": {"PARALLEL_MIN_STORIES": 0}}}
    splits = [p for p in (project / "data" / "subsample").glob("*.parquet")]
    return {"1 worker": one, f"stage's {clean_workers(splits)} workers": None}


def compare(project: Path, stage: str, settings: dict, repeat: int, outputs, reference: list[Path]) -> list[dict]:
    """Each setting `repeat` times, alternating; every run's outputs checked against `reference`."""
    expected = digest(reference) if reference else None
    rows = []
    for i in range(repeat):
        for label, (overrides, env) in settings.items():
            paths, args = outputs(label)
            remove(*paths)
            figures = run(stage_command(stage, overrides, args), project, env)
            got = digest(paths)
            if expected is None:
                expected = got
            figures.update(setting=label, repeat=i + 1, identical=got == expected)
            rows.append(figures)
            remove(*paths)
            print(f"  {stage} {label:>10s} run {i + 1}: {figures['wall_s']:6.2f} s wall, {figures['cpu_s']:6.2f} s cpu, "
                  f"others {figures['others_cpu_s']:5.1f} s cpu, peak {figures['peak_mib']:5.0f} MiB, "
                  f"outputs {'identical' if figures['identical'] else 'DIFFER'}", flush=True)
    return rows


def summarise(title: str, rows: list[dict]) -> dict:
    by = {}
    for row in rows:
        by.setdefault(row["setting"], []).append(row)
    med = {label: statistics.median(r["wall_s"] for r in runs) for label, runs in by.items()}
    one, every = list(med)
    line = {"stage": title, **{f"{label} wall s": med[label] for label in med},
            "ratio": med[one] / med[every], "identical": all(r["identical"] for r in rows),
            "others_cpu_s": sum(r["others_cpu_s"] for r in rows) / len(rows)}
    cpu = {label: statistics.median(r["cpu_s"] for r in runs) for label, runs in by.items()}
    print(f"{title:24s} {one}: {med[one]:6.2f} s   {every}: {med[every]:6.2f} s   ratio {line['ratio']:.2f}x   "
          f"cpu {cpu[one]:.1f} / {cpu[every]:.1f} s   others' cpu {line['others_cpu_s']:.1f} s a run   "
          f"outputs {'identical' if line['identical'] else 'DIFFER'}", flush=True)
    return line


def clean_outputs(project: Path):
    def outputs(label: str):
        tag = label.split()[-2]
        data, metrics = project / "data" / f"par-clean-{tag}", project / "metrics" / f"par-clean-{tag}.json"
        return [data, metrics], ["data/subsample", str(data.relative_to(project)), str(metrics.relative_to(project)),
                                 "--params", "params.yaml"]
    return outputs


def tokenize_outputs(project: Path):
    def outputs(label: str):
        data = project / "data" / f"par-tokens-{label.split()[-2]}"
        return [data], ["data/clean", "data/tokenizer.json", str(data.relative_to(project)), "--params", "params.yaml"]
    return outputs


def head_project(project: Path, n: int) -> Path:
    """A project whose subsample is the first n train stories of `project`'s (no validation split)."""
    folder = project / "par-sizes" / f"size_{n}"
    (folder / "data" / "subsample").mkdir(parents=True, exist_ok=True)
    shutil.copy(project / "params.yaml", folder / "params.yaml")
    table = pq.read_table(project / "data" / "subsample" / "train.parquet").slice(0, n)
    pq.write_table(table, folder / "data" / "subsample" / "train.parquet", compression="zstd", row_group_size=4096)
    return folder


def train_tokenizer_rows(project: Path, repeat: int) -> list[dict]:
    out = project / "data" / "par-tokenizer.json"
    args = ["data/clean/train.parquet", str(out.relative_to(project))]
    settings = {"whole list": [sys.executable, "-c", WHOLE_LIST_TRAIN_TOKENIZER, *args, "params.yaml"],
                "streamed": [sys.executable, "-m", "stages.train_tokenizer", *args, "--params", "params.yaml"]}
    expected = digest([project / "data" / "tokenizer.json"])["*"]
    rows = []
    for i in range(repeat):
        for label, command in settings.items():
            remove(out)
            figures = run(command, project)
            figures.update(setting=label, repeat=i + 1, identical=digest([out])["*"] == expected)
            remove(out)
            rows.append(figures)
            print(f"  train_tokenizer {label:>10s} run {i + 1}: {figures['wall_s']:6.2f} s wall, peak {figures['peak_mib']:5.0f} MiB, "
                  f"tokenizer.json {'identical' if figures['identical'] else 'DIFFERS'}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="a project folder left by data_scale.py --keep")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each setting (default: 2)")
    parser.add_argument("--stages", default="clean,tokenize", help="clean and/or tokenize (default: both)")
    parser.add_argument("--clean-sizes", default="", help="corpus sizes for the clean threshold, e.g. 5000,10000,20000")
    parser.add_argument("--train-tokenizer", action="store_true", help="also compare train_tokenizer streamed vs whole list")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    project = args.project.resolve()
    for needed in ("params.yaml", "data/subsample/train.parquet", "data/clean", "data/tokenizer.json", "data/tokens"):
        if not (project / needed).exists():
            parser.error(f"{project} has no {needed}; make it with benchmarks/data_scale.py --keep (see above)")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda sig, frame: os.kill(os.getpid(), signal.SIGINT))
    stories = pq.read_metadata(project / "data" / "subsample" / "train.parquet").num_rows
    print(f"cpu: {cpu_name()}, {psutil.cpu_count()} cores ({available_cores()} ours), nice {os.nice(0)}; "
          f"python {sys.version.split()[0]}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"project {project}: {stories:,} train stories; busy now: {busy_processes() or 'nothing'}", flush=True)
    summary, report = [], {"cpu": cpu_name(), "cores": psutil.cpu_count(), "stories": stories, "runs": {}}
    with stopping_on_interrupt(then=lambda: remove(project / "par-sizes")):
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        if "clean" in stages:
            settings = {label: (overrides, None) for label, overrides in clean_settings(project, force=False).items()}
            rows = compare(project, "stages.clean", settings, args.repeat, clean_outputs(project),
                           [project / "data" / "clean", project / "metrics" / "clean.json"])
            summary.append(summarise(f"clean {stories:,}", rows))
            report["runs"]["clean"] = rows
        if "tokenize" in stages:
            cores = available_cores()
            settings = {"1 thread": (None, {"RAYON_NUM_THREADS": "1"}), f"{cores} threads": (None, {"RAYON_NUM_THREADS": None})}
            rows = compare(project, "stages.tokenize", settings, args.repeat, tokenize_outputs(project),
                           [project / "data" / "tokens"])
            summary.append(summarise(f"tokenize {stories:,}", rows))
            report["runs"]["tokenize"] = rows
        for n in sorted({int(s) for s in args.clean_sizes.split(",") if s.strip()}):
            folder = head_project(project, n)
            settings = {label: (overrides, None) for label, overrides in clean_settings(folder, force=True).items()}
            rows = compare(folder, "stages.clean", settings, args.repeat, clean_outputs(folder), [])
            summary.append(summarise(f"clean {n:,} (forced)", rows))
            report["runs"][f"clean_{n}"] = rows
            remove(folder)
        if args.train_tokenizer:
            rows = train_tokenizer_rows(project, args.repeat)
            report["runs"]["train_tokenizer"] = rows
            for label in ("whole list", "streamed"):
                runs = [r for r in rows if r["setting"] == label]
                print(f"train_tokenizer {label:>10s}: median {statistics.median(r['wall_s'] for r in runs):.1f} s, "
                      f"peak {max(r['peak_mib'] for r in runs):.0f} MiB, identical {all(r['identical'] for r in runs)}")
        report["summary"] = summary
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not all(line["identical"] for line in summary):
        sys.exit("outputs differ between runs or from the project's own; see above")


if __name__ == "__main__":
    main()
