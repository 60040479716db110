"""Benchmark the data stages at scale: time and peak memory of download, subsample, clean,
train_tokenizer, tokenize and chat_data on synthetic corpora of 15 k, 150 k and 1.5 M stories.

    . .venv/bin/activate
    nice -n 19 python benchmarks/data_scale.py --sizes 15000,150000            # a few minutes
    nice -n 19 python benchmarks/data_scale.py --sizes 15000,150000,1500000 --json /tmp/data_scale.json
    nice -n 19 python benchmarks/data_scale.py --sizes 150000 --stages clean,tokenize --workdir /tmp/ds --keep

The corpus: the real stories of /work/shared/data/tinystories (--source; 15,388 stories), cleaned
by the clean stage's own normalise, filters and dedup, split into sentences (the separators, a
space or a paragraph break, are kept). Story i of a synthetic corpus is a seeded random source
story whose sentences, a quarter of them and at least two, are swapped for sentences drawn from
every source story: the stories keep TinyStories' lengths, words and paragraphs, and the clean
stage's exact dedup does not collapse them. Every story passes the clean stage's filters (min/max
chars, the fragment filter): the script checks it. numpy default_rng(--seed), so a size is the
same corpus on every run. Written as --shards parquet shards (a `text` column) plus a validation
shard (1 % of the size, at least 500 stories) under --workdir (default: a new folder under /tmp,
never inside the repo), deleted at the end unless --keep.

Each size gets a project root of its own, WORK/size_N/ with params.yaml (the repo's, with
data.source = the synthetic folder and data.fraction = 1.0), data/ and metrics/; the stages run
there one after the other, each as `python -m stages.<name> <dvc.yaml's paths> --params
params.yaml` in a process of its own (cwd = that folder, PYTHONPATH = the repo), as dvc repro runs
them. Per stage:
  * wall seconds, and CPU seconds (user + system, from /usr/bin/time);
  * stories/s: the stories the stage reads (download: the corpus; subsample: data/raw's train
    split; clean: data/subsample's train and validation; train_tokenizer: the clean train split;
    tokenize and chat_data: the clean splits they read) over wall seconds;
  * tokens/s: tokenize only, the tokens of its sidecars data/tokens/*.json over wall seconds;
  * peak RSS, measured from outside: the process tree's summed RSS polled with psutil every 50 ms,
    and the kernel's high-water mark of the stage process (/usr/bin/time's "Maximum resident set
    size", exact where polling can miss a spike); the table shows the larger.
The machine may be shared (this runs under nice): the CPU seconds say what the stage did when the
wall seconds are stretched by others. All figures come from the one run that prints them.

Goals, checked at the largest size against the next smaller one (the summary):
  * each stage's time grows at most 1.2x faster than linear: (t_large / t_small) / (N_large / N_small) <= 1.2;
  * peak RSS <= 2 GiB for every stage but train_tokenizer (whose peak is reported);
  * the whole data pipeline (the six stages) in <= 30 min.

--stages measures a subset; a stage whose inputs are missing gets the stages that make them run
first (shown, marked "needed"). With --workdir and --keep, a later run reuses what is there.
Ctrl-C (or SIGTERM) stops the running stage; no process outlives the script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import regex
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import cpu_name, run_watched, stopping_on_interrupt  # noqa: E402  (benchmarks/common.py)
from librarian.data.clean import clean_stories, rejection  # noqa: E402
from librarian.core.config import load_params  # noqa: E402
from librarian.data.sources import read_local  # noqa: E402

SOURCE = Path("/work/shared/data/tinystories")
# Each stage: its command line (dvc.yaml's paths), what it reads, and the output that tells it ran.
STAGES = {
    "download": (["data/raw"], ["corpus"], "data/raw"),
    "subsample": (["data/raw", "data/subsample"], ["data/raw"], "data/subsample"),
    "clean": (["data/subsample", "data/clean", "metrics/clean.json"], ["data/subsample"], "data/clean"),
    "train_tokenizer": (["data/clean/train.parquet", "data/tokenizer.json"], ["data/clean"], "data/tokenizer.json"),
    "tokenize": (["data/clean", "data/tokenizer.json", "data/tokens"], ["data/clean", "data/tokenizer.json"],
                 "data/tokens"),
    "chat_data": (["data/clean", "data/chat", "metrics/chat_data.json"], ["data/clean"], "data/chat"),
}
MAKER = {"corpus": None, "data/raw": "download", "data/subsample": "subsample", "data/clean": "clean",
         "data/tokenizer.json": "train_tokenizer"}
GOAL_SLOPE = 1.2            # at most this much slower than linear, size to size
GOAL_RSS_MIB = 2048         # 2 GiB, every stage but train_tokenizer
GOAL_PIPELINE_S = 30 * 60   # the six stages at the largest size
RSS_EXEMPT = {"train_tokenizer"}
TIME = "/usr/bin/time"
MARKER = ".data_scale"      # a work folder this script made (and may delete)

# A sentence ends with . ! ? and any closing quotes or brackets, then whitespace: the whitespace is
# kept apart (a space, or a newline between paragraphs, once normalised).
_SENTENCE_END = regex.compile(r"""(?<=[.!?]["')\]]*)(\s+)""")
_COMPLETE = regex.compile(r"""^["'(]?[A-Z].*[.!?]["')\]]*$""", regex.S)


# --- the synthetic corpus -----------------------------------------------------------------------


class Recombiner:
    """Synthetic stories from the sentences of real ones (seeded; see the module docstring)."""

    def __init__(self, stories: list[str], params):
        self.params = params
        self.sentences, self.separators = [], []
        pool = []
        for story in stories:
            pieces = _SENTENCE_END.split(story)
            sentences, separators = pieces[0::2], pieces[1::2] + [""]
            if not _COMPLETE.match(sentences[-1]):  # a last piece the fragment filter would reject
                sentences[-1] = None
            self.sentences.append(sentences)
            self.separators.append(separators)
            pool.extend(s for s in sentences if s and 20 <= len(s) <= 300 and _COMPLETE.match(s))
        self.pool = pool
        self.lengths = np.array([len(s) for s in self.sentences])
        self.max_sentences = int(self.lengths.max())

    def stories(self, n: int, rng: np.random.Generator, batch: int = 20_000):
        """Yield n stories, `batch` at a time (lists)."""
        for start in range(0, n, batch):
            b = min(batch, n - start)
            src = rng.integers(0, len(self.sentences), b)
            lengths = self.lengths[src]
            swaps = np.minimum(lengths, np.maximum(2, lengths // 4))
            # Distinct positions per story, vectorised: the ranks of random keys, padding last.
            keys = rng.random((b, self.max_sentences))
            keys[np.arange(self.max_sentences)[None, :] >= lengths[:, None]] = 2.0
            order = np.argsort(keys, axis=1)
            picks = rng.integers(0, len(self.pool), (b, self.max_sentences + 8))
            out = []
            for row in range(b):
                s = src[row]
                sentences, k, drawn = list(self.sentences[s]), swaps[row], picks[row]
                for j, pos in enumerate(order[row, :k]):
                    sentences[pos] = self.pool[drawn[j]]
                extra = self.max_sentences
                for pos in range(len(sentences)):  # an incomplete last piece not swapped
                    if sentences[pos] is None:
                        sentences[pos], extra = self.pool[drawn[extra]], extra + 1
                text = "".join(itertools.chain.from_iterable(zip(sentences, self.separators[s])))
                while rejection(text, self.params):  # too short: one more sentence
                    text = f"{text} {self.pool[drawn[extra % len(drawn)]]}"
                    extra += 1
                    if extra > len(drawn) + 50:
                        raise RuntimeError(f"cannot make story {start + row} pass the clean filters")
                out.append(text)
            yield out


def write_corpus(folder: Path, recombiner: Recombiner, size: int, shards: int, seed: int) -> dict:
    """folder/train-XXXX-of-YYYY.parquet and folder/validation-0000-of-0001.parquet; their counts."""
    folder.mkdir(parents=True)
    started = time.perf_counter()
    rngs = np.random.default_rng(seed).spawn(2)
    val = max(500, size // 100)
    plan = [(f"train-{i:04d}-of-{shards:04d}.parquet", size * (i + 1) // shards - size * i // shards, rngs[0])
            for i in range(shards)] + [("validation-0000-of-0001.parquet", val, rngs[1])]
    chars = 0
    for name, n, rng in plan:
        writer = pq.ParquetWriter(folder / name, pa.schema([("text", pa.string())]), compression="zstd")
        try:
            for batch in recombiner.stories(n, rng):
                chars += sum(map(len, batch))
                writer.write_table(pa.table({"text": pa.array(batch, type=pa.string())}), row_group_size=4096)
        finally:
            writer.close()
    info = {"train_stories": size, "validation_stories": val, "shards": shards + 1, "chars": chars,
            "bytes": sum(p.stat().st_size for p in folder.iterdir()), "seconds": time.perf_counter() - started}
    (folder.parent / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --- running a stage ----------------------------------------------------------------------------

def run_stage(name: str, folder: Path, log: Path) -> dict:
    """Run stages.<name> in `folder`; wall and CPU seconds, peak RSS (MiB), exit code."""
    args = [sys.executable, "-m", f"stages.{name}", *STAGES[name][0], "--params", "params.yaml"]
    timed = Path(TIME).exists()
    time_out = folder / f".time-{name}"
    if timed:
        args = [TIME, "-f", "%M %U %S", "-o", str(time_out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        # /usr/bin/time's own memory is not the stage's: it reports the stage's peak itself.
        proc, wall, peak = run_watched(args, skip_root=timed, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    rc = proc.returncode
    result = {"wall_s": wall, "exit_code": rc, "polled_peak_rss_mib": peak / 2**20, "kernel_peak_rss_mib": None,
              "cpu_s": None}
    if timed and time_out.exists():
        fields = time_out.read_text().split()[-3:]  # after any "Command exited with non-zero status" line
        try:
            result["kernel_peak_rss_mib"] = int(fields[0]) / 1024
            result["cpu_s"] = float(fields[1]) + float(fields[2])
        except (ValueError, IndexError):
            pass
        time_out.unlink()
    result["peak_rss_mib"] = max(result["polled_peak_rss_mib"], result["kernel_peak_rss_mib"] or 0)
    return result


def rows_of(paths) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def stories_in(name: str, folder: Path) -> int:
    data = folder / "data"
    if name == "download":
        return rows_of(sorted((folder / "corpus").glob("*.parquet")))
    if name == "subsample":
        return rows_of([data / "raw" / "train.parquet"])
    if name == "clean":
        return rows_of(p for p in (data / "subsample" / "train.parquet", data / "subsample" / "validation.parquet")
                       if p.exists())
    if name == "train_tokenizer":
        return rows_of([data / "clean" / "train.parquet"])
    if name == "tokenize":
        return rows_of(sorted((data / "clean").glob("*.parquet")))
    return rows_of([data / "clean" / f"{split}.parquet" for split in ("train", "val", "test")])  # chat_data


def stage_note(name: str, folder: Path, figures: dict) -> str:
    """What the stage made, from its outputs."""
    data, metrics = folder / "data", folder / "metrics"
    if name == "download":
        manifest = json.loads((data / "raw" / "manifest.json").read_text())
        return ", ".join(f"{split} {info['stories']}" for split, info in manifest["splits"].items())
    if name == "subsample":
        return f"train {rows_of([data / 'subsample' / 'train.parquet'])}"
    if name == "clean":
        report = json.loads((metrics / "clean.json").read_text())
        dropped = {k: v for part in ("train_pool", "official_validation") if part in report
                   for k, v in report[part]["dropped"].items() if v}
        figures["clean_dropped"] = dropped
        return "splits " + " ".join(f"{k} {v}" for k, v in report["splits"].items()) + \
            "; dropped " + (", ".join(f"{v} {k}" for k, v in dropped.items()) or "none")
    if name == "train_tokenizer":
        vocab = len(json.loads((data / "tokenizer.json").read_text())["model"]["vocab"])
        return f"vocab {vocab}"
    if name == "tokenize":
        sidecars = [json.loads(p.read_text()) for p in sorted((data / "tokens").glob("*.json"))]
        figures["tokens"] = sum(s["tokens"] for s in sidecars)
        figures["tokens_per_s"] = figures["tokens"] / figures["wall_s"]
        return f"{figures['tokens']:,} tokens in {len(sidecars)} splits"
    report = json.loads((metrics / "chat_data.json").read_text())
    return f"{sum(m['conversations'] for m in report.values()):,} conversations in {len(report)} tables"


def write_params(folder: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "corpus"  # relative to the params file's folder
    params["data"]["fraction"] = 1.0
    (folder / "params.yaml").write_text("# data_scale.py: the repo's params.yaml, data.source and data.fraction set\n"
                                        + yaml.safe_dump(params, sort_keys=False))
    load_params(folder / "params.yaml")  # fails here, not in a stage, if it does not validate


def plan(selected: list[str], folder: Path) -> list[tuple[str, bool]]:
    """The stages to run in order, each with whether it was selected (else: needed for an input)."""
    needed = set(selected)
    for name in reversed(list(STAGES)):
        if name in needed:
            for path in STAGES[name][1]:
                maker = MAKER.get(path)
                if maker and not (folder / path).exists():
                    needed.add(maker)
    return [(name, name in selected) for name in STAGES if name in needed]


# --- the report ---------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(size: int, corpus: dict, rows: list[dict]) -> None:
    print(f"\n== {size:,} stories (+ {corpus['validation_stories']:,} validation; "
          f"{corpus['chars'] / 1e6:,.0f} M chars, {corpus['bytes'] / 2**20:,.0f} MiB parquet, "
          f"made in {corpus['seconds']:.1f} s) ==")
    columns = [("stage", "stage", "{}"), ("stories_in", "stories in", "{:,}"), ("wall_s", "wall s", "{:.1f}"),
               ("cpu_s", "cpu s", "{:.1f}"), ("stories_per_s", "stories/s", "{:,.0f}"),
               ("tokens_per_s", "tokens/s", "{:,.0f}"), ("polled_peak_rss_mib", "RSS polled", "{:,.0f}"),
               ("kernel_peak_rss_mib", "RSS kernel", "{:,.0f}"), ("peak_rss_mib", "peak MiB", "{:,.0f}"),
               ("note", "made", "{}")]
    cells = []
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            text = "-" if value is None else spec.format(value)
            if key == "stage" and not row["selected"]:
                text += " (needed)"
            line.append(text)
        cells.append(line)
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(columns)]
    print("  ".join(title.ljust(w) if i in (0, len(columns) - 1) else title.rjust(w)
                    for i, ((_, title, _), w) in enumerate(zip(columns, widths))))
    for c in cells:
        print("  ".join(cell.ljust(w) if i in (0, len(columns) - 1) else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(c, widths))))
    total = sum(r["wall_s"] for r in rows)
    print(f"total {total:.1f} s ({total / 60:.1f} min) over {len(rows)} stage(s)")


def summary(results: dict[int, dict], selected: list[str]) -> dict:
    sizes = sorted(results)
    large = sizes[-1]
    small = sizes[-2] if len(sizes) > 1 else None
    by_size = {n: {r["stage"]: r for r in results[n]["stages"] if r["exit_code"] == 0} for n in sizes}
    goals = {"slope": {}, "peak_rss": {}}
    print(f"\n== summary: {large:,} stories" + (f" against {small:,}" if small else "") + " ==")
    if small:
        linear = results[large]["corpus"]["train_stories"] / results[small]["corpus"]["train_stories"]
        print(f"time ratio against linear ({linear:.1f}x); goal <= {GOAL_SLOPE}x linear. "
              f"Peak RSS at {large:,}; goal <= {GOAL_RSS_MIB:,} MiB (2 GiB), train_tokenizer reported only")
    print(f"{'stage':<16} {'wall s':>9} {'wall s':>9} {'ratio':>7} {'/linear':>8} {'cpu /linear':>11} {'slope goal':>10}"
          f" {'peak MiB':>9} {'RSS goal':>9}")
    print(f"{'':<16} {small or '-':>9} {large:>9}")
    for name in selected:
        big, little = by_size[large].get(name), by_size[small].get(name) if small else None
        ratio = slope = cpu_slope = None
        if big and little:
            ratio = big["wall_s"] / little["wall_s"]
            slope = ratio / linear
            if big["cpu_s"] and little["cpu_s"]:
                cpu_slope = big["cpu_s"] / little["cpu_s"] / linear
            goals["slope"][name] = {"ratio": ratio, "linear": linear, "over_linear": slope,
                                    "cpu_over_linear": cpu_slope, "met": slope <= GOAL_SLOPE}
        slope_mark = "-" if slope is None else ("met" if slope <= GOAL_SLOPE else "missed")
        rss = big["peak_rss_mib"] if big else None
        if name in RSS_EXEMPT:
            rss_mark = "reported"
        else:
            rss_mark = "-" if rss is None else ("met" if rss <= GOAL_RSS_MIB else "missed")
        if rss is not None:
            goals["peak_rss"][name] = {"mib": rss, "met": None if name in RSS_EXEMPT else rss <= GOAL_RSS_MIB}
        print(f"{name:<16} {fmt(little and little['wall_s'], '.1f'):>9} {fmt(big and big['wall_s'], '.1f'):>9} "
              f"{fmt(ratio, '.2f'):>7} {fmt(slope, '.2f'):>8} {fmt(cpu_slope, '.2f'):>11} {slope_mark:>10} "
              f"{fmt(rss, ',.0f'):>9} {rss_mark:>9}")
    done = [r for r in results[large]["stages"] if r["exit_code"] == 0 and r["stage"] in STAGES]
    failed = [r["stage"] for r in results[large]["stages"] if r["exit_code"] not in (0, None)]
    total = sum(r["wall_s"] for r in done)
    complete = {r["stage"] for r in done} == set(STAGES)
    mark = ("met" if total <= GOAL_PIPELINE_S else "missed") if complete else "not measured"
    what = "the six data stages" if complete else f"{len(done)} of the six stages ran"
    print(f"pipeline at {large:,} stories: {total:.0f} s = {total / 60:.1f} min ({what}); goal <= "
          f"{GOAL_PIPELINE_S // 60} min: {mark}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    goals["pipeline"] = {"stories": large, "seconds": total, "complete": complete,
                         "met": (total <= GOAL_PIPELINE_S) if complete else None}
    return goals


# --- main ---------------------------------------------------------------------------------------


def work_folder(arg: Path | None) -> Path:
    if arg is None:
        work = Path(tempfile.mkdtemp(prefix="data_scale-", dir="/tmp"))
    else:
        work = arg.expanduser().resolve()
        if work.is_relative_to(ROOT):
            raise SystemExit(f"--workdir {work} is inside the repo; use a folder outside it (default: under /tmp)")
        if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
            raise SystemExit(f"--workdir {work} is not empty and was not made by this script; pick another")
        work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by benchmarks/data_scale.py; deleted at its end unless --keep\n")
    return work


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="15000,150000,1500000", help="train stories per corpus (default: 15000,150000,1500000)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to measure (default: {','.join(STAGES)})")
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"real stories to recombine (default: {SOURCE})")
    parser.add_argument("--shards", type=int, default=4, help="train shards per corpus (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where corpora and stage outputs go (default: a new /tmp/data_scale-*)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: deleted at the end)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",")})
    selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := [s for s in selected if s not in STAGES]:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; pick from {', '.join(STAGES)}")
    selected = [s for s in STAGES if s in selected]
    if not sizes or min(sizes) < 1000 or max(sizes) > 2_000_000 or args.shards < 1:
        parser.error("--sizes must lie in 1000..2000000 and --shards be >= 1")

    # Ctrl-C, and SIGTERM made into one, raise KeyboardInterrupt: the finally stops the running stage.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (cmd &)
    signal.signal(signal.SIGTERM, lambda sig, frame: os.kill(os.getpid(), signal.SIGINT))
    work = work_folder(args.workdir)
    params = load_params(ROOT / "params.yaml")
    print(f"cpu: {cpu_name()}, {psutil.cpu_count()} cores, nice {os.nice(0)}; python {sys.version.split()[0]}; "
          f"work folder {work}", flush=True)
    results = {}

    def leave_work():
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    with stopping_on_interrupt(then=leave_work):
        started = time.perf_counter()
        real = read_local(args.source).splits["train"]
        sources, report = clean_stories(real, params.clean)
        recombiner = Recombiner(sources, params.clean)
        print(f"source: {args.source}: {len(real):,} stories, {len(sources):,} after the clean stage's rules; "
              f"{len(recombiner.pool):,} sentences to swap in; seed {args.seed}; {time.perf_counter() - started:.1f} s",
              flush=True)
        for size in sizes:
            folder = work / f"size_{size}"
            folder.mkdir(exist_ok=True)
            corpus_info = folder / "corpus.json"
            if corpus_info.exists() and (folder / "corpus").is_dir():
                corpus = json.loads(corpus_info.read_text())
            else:
                shutil.rmtree(folder / "corpus", ignore_errors=True)
                corpus = write_corpus(folder / "corpus", recombiner, size, args.shards, args.seed + size)
            write_params(folder)
            print(f"size {size:,}: corpus ready ({corpus['seconds']:.1f} s); running "
                  f"{', '.join(n for n, _ in plan(selected, folder))}", flush=True)
            rows, broken = [], None
            for name, chosen in plan(selected, folder):
                if broken:
                    rows.append({"stage": name, "selected": chosen, "exit_code": None, "wall_s": 0.0,
                                 "note": f"skipped: {broken} failed"})
                    continue
                count = stories_in(name, folder)
                figures = run_stage(name, folder, folder / f"{name}.log")
                figures.update(stage=name, selected=chosen, stories_in=count,
                               stories_per_s=count / figures["wall_s"])
                if figures["exit_code"] == 0:
                    figures["note"] = stage_note(name, folder, figures)
                else:
                    broken = name
                    tail = (folder / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                    figures["note"] = f"FAILED (exit {figures['exit_code']}): " + " | ".join(tail)[-300:]
                rows.append(figures)
                print(f"  {name}: {figures['wall_s']:.1f} s, peak {figures['peak_rss_mib']:,.0f} MiB; "
                      f"{figures['note']}", flush=True)
            results[size] = {"corpus": corpus, "stages": rows}
            print_table(size, corpus, rows)
            sys.stdout.flush()
            if not args.keep:
                shutil.rmtree(folder)
        goals = summary(results, selected)
        if args.json:
            report = {"cpu": cpu_name(), "cores": psutil.cpu_count(), "nice": os.nice(0), "seed": args.seed,
                      "source": str(args.source), "source_stories": len(real), "sizes": sizes, "stages": selected,
                      "results": {str(n): r for n, r in results.items()}, "goals": goals}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
