"""Benchmark evaluation: tokens scored per second against training tokens per second, same run.

    python benchmarks/evaluate_throughput.py [--stories 3000 --repeats 5]
    python benchmarks/evaluate_throughput.py --sweep-widths 128,256,512   # behind threads' auto rule

Data: real TinyStories text (/work/shared/data/tinystories, or --corpus): a byte-level BPE of
the card's vocab (8000) is trained on the first --stories stories, which are then tokenized as the
train split, and the next --stories // 4 as the test split, by the pipeline's own code
(librarian/data/tokenizer.py, librarian/data/tokens.py). The model has the card's architecture and fresh
random weights: speed does not depend on what they say.

Training: librarian.training.train.Trainer with params.yaml as it is (the card's config: batch 32 x 128
tokens, train.amp as the policy resolves it (bf16 autocast on a CPU with native bf16, float32 else), AdamW, train.threads 0 = torch's default of one thread per core), timed over
its real Trainer.step (train_step and the loop's accounting: the tokens credited are those of the batch
taken); also on the scoring's thread count. Scoring: librarian.evaluation.evaluate.score_tokens
on the test split at params.yaml's eval settings (stride 64, batch 64) on eval.threads (0 = auto,
librarian/core/threads.py: whole batches in parallel, one per core); also shown with the trunk in
float32, on the other thread count, and with a busy-loop process on one core. Figures are medians
over --repeats interleaved rounds; a round that other processes disturbed is rerun (see common.py),
and the CPU they took is reported: the machine may be shared.

Goal: scoring >= 2x training throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import at, busy_core, card_config, cpu_name, cpu_precision, cycled_step, medians  # noqa: E402

from librarian.core.config import load_params  # noqa: E402
from librarian.core.precision import resolve_precision  # noqa: E402
from librarian.data.windows import epoch_order, load_tokens  # noqa: E402
from librarian.evaluation.evaluate import score_tokens  # noqa: E402
from librarian.model.gpt import GPT  # noqa: E402
from librarian.data.sources import read_shard  # noqa: E402
from librarian.core.threads import available_cores, resolve_threads, using_threads  # noqa: E402
from librarian.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from librarian.data.tokens import tokenize_corpus  # noqa: E402
from librarian.training.train import TrainPaths, Trainer, build_trainer  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "tinystories" / "train-v2-part-000-cs336-sample5M.txt.gz"
GOAL_RATIO = 2.0
GOAL_NOT_SLOWER = 0.95  # default scoring / float32 trunk: "not slower", within the rounds' noise


def make_tokens(corpus: Path, n_stories: int, params, work: Path) -> Path:
    """train and test token files of real stories, made by the tokenize stage's code."""
    stories = read_shard(corpus)
    train, test = stories[:n_stories], stories[n_stories : n_stories + n_stories // 4]
    if len(test) < 100:
        raise SystemExit(f"{corpus} has {len(stories)} stories; lower --stories")
    save_tokenizer(train_tokenizer(train, params.tokenizer), work / "tokenizer.json")
    clean = work / "clean"
    clean.mkdir()
    for split, texts in (("train", train), ("val", test), ("test", test)):
        pq.write_table(pa.table({"text": texts}), clean / f"{split}.parquet")
    tokenize_corpus(clean, work / "tokenizer.json", work / "tokens", params.tokenize.chunk_stories)
    return work / "tokens"


def training_rate(trainer: Trainer) -> float:
    """Tokens/s of one real optimizer step (forward, backward, AdamW) of the card's config."""
    order = epoch_order(len(trainer.train_windows), 0, 0)
    start = time.perf_counter()
    _, tokens = cycled_step(trainer, order)  # the batch the step took: less than the full one in a batch warmup
    return tokens / (time.perf_counter() - start)


def scoring_rate(model: GPT, tokens: np.ndarray, eval_params, threads: int, amp: bool | None = None) -> float:
    """Tokens scored per second by the evaluate stage's scoring at eval's stride and batch size, in
    the precision eval.amp (or `amp`) resolves to on this CPU, as the stage does."""
    precision = resolve_precision("cpu", eval_params.amp if amp is None else amp)
    start = time.perf_counter()
    counts = score_tokens(model, tokens, model.config.context_length, eval_params.stride, eval_params.batch_size,
                          precision=precision, threads=threads)
    return counts["tokens"] / (time.perf_counter() - start)


def compare(args, params, work: Path) -> dict:
    tokens_dir = make_tokens(args.corpus, args.stories, params, work)
    test = load_tokens(tokens_dir / "test.bin").tokens[: args.score_tokens]
    cores = available_cores()
    train_threads = params.train.threads or cores  # 0: torch's default, a thread per core
    with using_threads(train_threads):
        trainer = build_trainer(params, tokens_dir, TrainPaths(model=work / "model", curves=work / "live",
                                                               speed=work / "speed", state=work / "state"))
    trainer.model.train()
    eval_threads = resolve_threads(params.eval.threads, trainer.model.config.d_model, "eval.threads", batched=True)
    other = 1 if eval_threads != 1 else cores
    model = trainer.model
    runs = {
        "training": lambda: at(train_threads, lambda: training_rate(trainer)),
        f"training_{eval_threads}_threads": lambda: at(eval_threads, lambda: training_rate(trainer)),
        "scoring": lambda: scoring_rate(model, test, params.eval, eval_threads),
        "scoring_fp32_trunk": lambda: scoring_rate(model, test, params.eval, eval_threads, amp=False),
        f"scoring_{other}_threads": lambda: scoring_rate(model, test, params.eval, other),
    }
    if train_threads == eval_threads:
        del runs[f"training_{eval_threads}_threads"]
    load: dict = {}
    rates = medians(runs, args.repeats, load)
    with busy_core():  # a busy-loop process on one core: scoring shares it, it does not collapse
        rates["scoring_one_core_busy"] = medians({"busy": runs["scoring"]}, args.repeats)["busy"]
    report = {
        "data": f"{args.stories} stories of {args.corpus.name} (train), {len(test):,} tokens of the next ones scored",
        "train_threads": train_threads, "eval_threads": eval_threads, "eval_stride": params.eval.stride,
        "eval_batch_size": params.eval.batch_size, "tokens_per_s": {name: round(r) for name, r in rates.items()},
        **load,
    }
    report["scoring_over_training"] = round(rates["scoring"] / rates["training"], 2)
    if f"training_{eval_threads}_threads" in rates:
        report[f"scoring_over_training_on_{eval_threads}_threads"] = round(
            rates["scoring"] / rates[f"training_{eval_threads}_threads"], 2)
    report["goal_scoring_ge_2x_training"] = report["scoring_over_training"] >= GOAL_RATIO
    # The default scoring (eval.amp as resolved here) is not slower than the float32 trunk.
    report["scoring_precision"] = resolve_precision("cpu", params.eval.amp).name
    report["scoring_over_fp32_trunk"] = round(rates["scoring"] / rates["scoring_fp32_trunk"], 2)
    report["goal_default_scoring_ge_fp32"] = report["scoring_over_fp32_trunk"] >= GOAL_NOT_SLOWER
    return report


def sweep_widths(widths: list[int], args) -> list[dict]:
    """Scoring tokens/s on one thread and on every core, for the card's shape at other widths."""
    rows, cores, params = [], available_cores(), load_params(ROOT / "params.yaml")
    tokens = np.random.default_rng(0).integers(0, 8000, args.score_tokens // 4).astype(np.uint16)
    for width in widths:
        torch.manual_seed(0)
        model = GPT(card_config(d_model=width, d_ff=2 * width, n_head=max(4, width // 64)))
        load: dict = {}
        runs = {n: lambda n=n, model=model: scoring_rate(model, tokens, params.eval, n) for n in (1, cores)}
        rates = medians(runs, args.repeats, load)
        rows.append({"d_model": width, "n_params": model.n_params(), "one_thread_tokens_per_s": round(rates[1]),
                     f"{cores}_threads_tokens_per_s": round(rates[cores]),
                     f"{cores}_threads_over_one": round(rates[cores] / rates[1], 2), **load})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="a .txt.gz of stories separated by <|endoftext|>")
    parser.add_argument("--stories", type=int, default=3000, help="stories to train the tokenizer on (and train)")
    parser.add_argument("--score-tokens", type=int, default=30_000, help="test tokens scored per round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-widths", help="comma-separated d_model values: score on 1 thread and on every core")
    args = parser.parse_args()
    report = {"cpu": cpu_name(), **cpu_precision(), "cores": available_cores(), "repeats": args.repeats}
    if args.sweep_widths:
        report["sweep"] = sweep_widths([int(w) for w in args.sweep_widths.split(",")], args)
    else:
        with tempfile.TemporaryDirectory() as work:
            report.update(compare(args, load_params(ROOT / "params.yaml"), Path(work)))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
