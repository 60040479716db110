"""Benchmark the tokenize stage against raw `Tokenizer.encode_batch`, and its peak memory.

    python benchmarks/tokenize_throughput.py --source ../shared/data/tinystories

Throughput: the stage's streaming encoder (parquet in, uint16 file out) and a bare
`encode_batch` over the same stories, interleaved, best of --repeats; the ratio is the figure
that matters on a shared, noisy machine. Goal: stage >= 0.9x raw.

Memory: the tokenize stage runs in a fresh process on the corpus and on the corpus repeated
--scale times; peak RSS should stay flat, since encoding streams in chunks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from librarian.data.clean import clean_stories  # noqa: E402
from librarian.core.config import load_params  # noqa: E402
from librarian.core.io import write_stories  # noqa: E402
from librarian.data.sources import read_local  # noqa: E402
from librarian.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from librarian.data.tokens import encode_split  # noqa: E402

MEMORY_PROBE = """
import sys
sys.path.insert(0, {root!r})
from librarian.data.tokens import tokenize_corpus
tokenize_corpus({clean!r}, {tok!r}, {out!r}, {chunk})
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="local TinyStories path (as data.source)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=8, help="corpus multiple for the memory check")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    stories, _ = clean_stories(read_local(Path(args.source)).splits["train"], params.clean)
    chunk = params.tokenize.chunk_stories

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_path = tmp / "tokenizer.json"
        save_tokenizer(train_tokenizer(stories, params.tokenizer), tok_path)
        tokenizer = load_tokenizer(tok_path)
        write_stories(tmp / "train.parquet", stories)

        raw_times, stage_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            encodings = tokenizer.encode_batch(stories)
            raw_times.append(time.perf_counter() - start)
            n_tokens = sum(len(e.ids) for e in encodings) + len(stories)
            del encodings
            start = time.perf_counter()
            counts = encode_split(tmp / "train.parquet", tmp / "train.bin", tokenizer, chunk, desc="stage")
            stage_times.append(time.perf_counter() - start)
        assert counts["tokens"] == n_tokens
        raw, stage = min(raw_times), min(stage_times)

        memory = {}
        for scale in (1, args.scale):
            clean = tmp / f"clean-x{scale}"
            clean.mkdir()
            write_stories(clean / "train.parquet", stories * scale)
            probe = MEMORY_PROBE.format(root=str(ROOT), clean=str(clean), tok=str(tok_path), out=str(tmp / f"tok-x{scale}"), chunk=chunk)
            run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
            memory[scale] = int(run.stdout.strip().splitlines()[-1]) / 1024

    print(json.dumps({
        "stories": len(stories),
        "tokens": counts["tokens"],
        "chars_per_token": round(sum(map(len, stories)) / counts["tokens"], 3),
        "raw_encode_batch_tokens_per_s": round(counts["tokens"] / raw),
        "tokenize_stage_tokens_per_s": round(counts["tokens"] / stage),
        "stage_over_raw": round(raw / stage, 3),
        "peak_rss_mib": {f"x{k} ({counts['tokens'] * k} tokens)": round(v, 1) for k, v in memory.items()},
        "benchmark_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
