"""Benchmark training throughput (tokens/s) of the train stage's own step on this CPU.

    . .venv/bin/activate
    python benchmarks/train_throughput.py                       # every setup, a few minutes
    python benchmarks/train_throughput.py --rounds 9 --steps 6  # steadier figures, slower
    python benchmarks/train_throughput.py --only compile_sdpa_fused_loss,threads_1
    python benchmarks/train_throughput.py --list                # the setups and the params they set

What it times: librarian.train.Trainer.train_step itself -- the learning rate from lr_at, the
forward and loss through TrainingLoss (with train.fused_loss / train.compile as the params say),
autocast as train.amp, backward, the AdamW that build_optimizer makes, zero_grad -- on a Trainer
built from the project's params.yaml (--params), so the benchmark runs exactly what `train` runs
and cannot drift from it. Each setup is params.yaml with a few keys overridden (validated by
librarian.config like any params file); the batch, lr, decay and model are params.yaml's. The
Trainer reads a train.bin / val.bin pair of random token ids of the tokenizer's vocab, written
with their sidecars in a temporary folder: speed does not depend on what the tokens say.

Setups -- every one a params.yaml the train stage accepts:
  * card_eager_amp is THE BASELINE of every ratio: the card's execution (model.attention manual,
    train.amp true, train.compile false, train.fused_loss false, train.threads 0).
  * the others change the keys --list shows: train.amp false; model.attention sdpa;
    train.fused_loss; train.compile; train.threads 1 or 2, and their combinations.
  * diagnostic_*: model.dropout 0, so not the card's model: shown for what dropout costs, never
    named the fastest.
Every setup runs on the CPU (train.device cpu); train.threads 0 means torch's default, the
thread count this process started with.

Noise: the machine may be shared, so every setup is built and warmed up first (train.compile
compiles there; its warmup_s depends on Inductor's on-disk cache), then timed in interleaved
rounds, each running --steps steps of every setup in turn. tokens/s is a setup's median over the
rounds; its ratio is the median of its per-round ratios to the baseline's tokens/s in that round.

Peak and MFU: fp32 and bf16 square matmuls (--matmul-size) are timed in every round; the best is
the achievable GFLOP/s. MFU = FLOPs per token x tokens/s / the peak of the setup's precision
(bf16 under train.amp), FLOPs per token being nanoGPT's estimate_mfu: 6 N + 12 n_layer d_model
context, N = GPT.n_params() (the tied embedding is the lm_head's matmul).

Prints a JSON report (progress goes to stderr). Goals: the fastest setup >= 3.5x the baseline,
and >= 25,000 tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from generate_throughput import cpu_name  # a sibling script: its folder is on sys.path when run
from librarian.config import Params, load_params, parse_params
from librarian.data import epoch_order
from librarian.errors import LibrarianError
from librarian.io import write_json
from librarian.threads import available_cores
from librarian.train import TrainPaths, build_trainer

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
GOAL_SPEEDUP = 3.5
GOAL_TOKENS_PER_S = 25_000
TRAIN_BATCHES = 8  # distinct batches in the random train split: the step cycles through them


# --- what is compared ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One params.yaml: the baseline's keys with these overridden (dotted names)."""

    name: str
    overrides: dict = field(default_factory=dict)
    diagnostic: bool = False  # not the card's model: may not be named the fastest


BASELINE = "card_eager_amp"
# The card's execution, whatever params.yaml says for these keys; the rest of params.yaml is kept.
CARD = {"model.attention": "manual", "train.amp": True, "train.compile": False, "train.fused_loss": False,
        "train.threads": 0, "train.device": "cpu"}
_FAST = {"model.attention": "sdpa", "train.fused_loss": True, "train.compile": True}
SETUPS = [
    Setup(BASELINE),
    Setup("card_eager_fp32", {"train.amp": False}),
    Setup("sdpa", {"model.attention": "sdpa"}),
    Setup("fused_loss", {"train.fused_loss": True}),
    Setup("sdpa_fused_loss", {"model.attention": "sdpa", "train.fused_loss": True}),
    Setup("compile", {"train.compile": True}),
    Setup("compile_sdpa", {"model.attention": "sdpa", "train.compile": True}),
    Setup("compile_sdpa_fused_loss", _FAST),
    Setup("threads_1", {"train.threads": 1}),
    Setup("threads_2", {"train.threads": 2}),
    Setup("diagnostic_no_dropout_compile_sdpa_fused_loss", _FAST | {"model.dropout": 0.0}, diagnostic=True),
]


def setup_params(base: dict, setup: Setup) -> Params:
    """params.yaml (as a dict) with the card's execution and the setup's overrides, validated."""
    raw = copy.deepcopy(base)
    for key, value in (CARD | setup.overrides).items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_params(raw, source=f"setup {setup.name}")


# --- the data ------------------------------------------------------------------------------------


def write_random_tokens(folder: Path, params: Params) -> Path:
    """train.bin / val.bin of random ids over the tokenizer's vocab, with sidecars as the tokenize stage's."""
    rng = np.random.default_rng(params.seed)
    ctx, vocab = params.model.context_length, params.tokenizer.vocab_size
    sizes = {"train": TRAIN_BATCHES * params.train.batch_size * params.train.grad_accum * params.train.stride + ctx + 1,
             "val": 4 * ctx + 1}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        ids = rng.integers(0, vocab, n, dtype=np.uint16)
        ids.tofile(folder / f"{split}.bin")
        write_json(folder / f"{split}.json", {
            "split": split, "tokens": n, "stories": 0, "utf8_bytes": 0, "dtype": "uint16", "vocab_size": vocab,
            "eot_id": 0, "tokenizer_sha256": "random", "layout": "random token ids (benchmark)"})
    return folder


# --- one setup, ready to step --------------------------------------------------------------------


class Run:
    """A real Trainer for one setup, stepped as Trainer._epochs steps it."""

    def __init__(self, setup: Setup, params: Params, tokens: Path, work: Path, default_threads: int):
        self.setup, self.params = setup, params
        # train.threads 0 is torch's default: restored here, since another setup may have changed it.
        self.threads = params.train.threads or default_threads
        torch.set_num_threads(self.threads)
        out = work / setup.name  # train_step writes nothing; the Trainer wants its folders named
        self.trainer = build_trainer(params, tokens, TrainPaths(model=out / "model", curves=out / "live",
                                                                speed=out / "speed", state=out / "state"))
        self.trainer.model.train()
        self.order = epoch_order(len(self.trainer.train_windows), params.seed, 0)
        self.warmup_s = 0.0

    def step(self) -> float:
        """One optimizer step through Trainer.train_step, then the loop's bookkeeping."""
        trainer, p = self.trainer, self.trainer.progress
        loss = trainer.train_step(self.order)
        p.step_in_epoch = (p.step_in_epoch + 1) % trainer.steps_per_epoch
        p.global_step += 1
        return loss

    def time_steps(self, steps: int) -> float:
        """Seconds for `steps` training steps."""
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - start


# --- peak and MFU --------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a (size x size) @ (size x size) matmul, best of `repeats`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def flops_per_token(run: Run) -> int:
    """Training FLOPs per token (nanoGPT's estimate_mfu): 6 N + 12 L d T."""
    config = run.trainer.model.config
    return 6 * run.trainer.model.n_params() + 12 * config.n_layer * config.d_model * config.context_length


# --- the benchmark -------------------------------------------------------------------------------


def warm_up(setups: list[Setup], base: dict, tokens: Path, work: Path, args) -> tuple[dict[str, Run], dict]:
    """Build and warm up every setup (train.compile compiles here); failures are reported, not fatal."""
    runs, failures = {}, {}
    for setup in setups:
        start = time.perf_counter()
        try:
            run = Run(setup, setup_params(base, setup), tokens, work, args.threads)
            loss = [run.step() for _ in range(args.warmup)][-1]
            if not math.isfinite(loss):
                raise RuntimeError(f"loss is {loss}")
        except Exception as error:  # a compile error must not sink the other setups
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            failures[setup.name] = {"error": last.splitlines()[0][:500]}
            print(f"[{setup.name}] FAILED: {last[:300]}", file=sys.stderr, flush=True)
            continue
        runs[setup.name] = run
        run.warmup_s = time.perf_counter() - start
        print(f"[{setup.name}] warmed up in {run.warmup_s:.1f}s (loss {loss:.3f})", file=sys.stderr, flush=True)
    return runs, failures


def timed_rounds(runs: dict[str, Run], args) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleaved rounds: every setup's tokens/s per round, and the best matmul peaks."""
    rates = {name: [] for name in runs}
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for round_no in range(args.rounds):
        torch.set_num_threads(args.threads)
        peaks["fp32"] = max(peaks["fp32"], matmul_gflops(torch.float32, args.matmul_size))
        peaks["bf16"] = max(peaks["bf16"], matmul_gflops(torch.bfloat16, args.matmul_size))
        for name, run in runs.items():
            rates[name].append(args.steps * run.trainer.tokens_per_step / run.time_steps(args.steps))
        line = ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items())
        print(f"round {round_no + 1}/{args.rounds} tokens/s: {line}", file=sys.stderr, flush=True)
    return rates, peaks


def setup_entry(run: Run, rates: list[float], base_rates: list[float], peaks: dict) -> dict:
    """One setup's figures: median tokens/s, ratio to the baseline, MFU against its precision's peak."""
    tokens_per_s = statistics.median(rates)
    precision = "bf16" if run.params.train.amp else "fp32"
    return {
        "tokens_per_s": round(tokens_per_s),
        "ratio_vs_baseline": round(statistics.median(r / b for r, b in zip(rates, base_rates)), 3),
        "mfu": round(flops_per_token(run) * tokens_per_s / (peaks[precision] * 1e9), 4),
        "mfu_of_peak": precision,
        "best_round_tokens_per_s": round(max(rates)),
        "step_ms": round(run.trainer.tokens_per_step / tokens_per_s * 1000, 1),
        "warmup_s": round(run.warmup_s, 1),
        "threads": run.threads,
        "n_params": run.trainer.model.n_params(),
        "params_set": run.setup.overrides,
        "diagnostic": run.setup.diagnostic,
    }


def report(runs: dict[str, Run], failures: dict, rates: dict, peaks: dict, args) -> dict:
    baseline = runs[BASELINE]
    setups = {name: setup_entry(run, rates[name], rates[BASELINE], peaks) for name, run in runs.items()}
    candidates = [name for name, run in runs.items() if not run.setup.diagnostic]
    fastest = max(candidates, key=lambda name: setups[name]["ratio_vs_baseline"])
    best = setups[fastest]
    tp = baseline.params.train
    return {
        "cpu": cpu_name(),
        "cores": available_cores(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "default_threads": args.threads,
        "params": str(args.params),
        "model": {"config": baseline.trainer.model.config.to_dict(), "n_params": baseline.trainer.model.n_params(),
                  "batch_size": tp.batch_size, "grad_accum": tp.grad_accum,
                  "tokens_per_step": baseline.trainer.tokens_per_step,
                  "train_flops_per_token": flops_per_token(baseline)},
        "method": {"timed": "librarian.train.Trainer.train_step", "warmup_steps": args.warmup,
                   "timed_rounds": args.rounds, "steps_per_round": args.steps,
                   "tokens_per_s": "median over the interleaved rounds",
                   "ratio_vs_baseline": "median of the per-round ratios to the baseline",
                   "mfu": "train_flops_per_token x tokens/s / matmul peak of the setup's precision"},
        "baseline": f"{BASELINE}: params.yaml with the card's execution {CARD}",
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()} | {"size": args.matmul_size},
        "setups": setups,
        "failed": failures,
        "fastest": fastest,
        "goals": {
            f"fastest_ge_{GOAL_SPEEDUP}x_baseline": best["ratio_vs_baseline"] >= GOAL_SPEEDUP,
            f"fastest_ge_{GOAL_TOKENS_PER_S}_tokens_per_s": best["tokens_per_s"] >= GOAL_TOKENS_PER_S,
            "fastest_ratio_vs_baseline": best["ratio_vs_baseline"],
            "fastest_tokens_per_s": best["tokens_per_s"],
        },
    }


def pick_setups(only: str) -> list[Setup]:
    """The setups named in --only (comma-separated), the baseline first; all of them by default."""
    wanted = set(filter(None, only.split(",")))
    unknown = wanted - {s.name for s in SETUPS}
    if unknown:
        raise SystemExit(f"unknown setups: {', '.join(sorted(unknown))}; see --list")
    return [s for s in SETUPS if not wanted or s.name in wanted | {BASELINE}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=PROJECT_PARAMS, help="the params file every setup starts from")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup (compiling happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setup per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="the threads of train.threads 0 (torch's default)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--only", default="", help="comma-separated setup names (the baseline is always run)")
    parser.add_argument("--list", action="store_true", help="list the setups and exit")
    args = parser.parse_args()
    if args.list:
        print(f"{BASELINE:48} params.yaml with {CARD}")
        for setup in SETUPS[1:]:
            print(f"{setup.name:48} {setup.overrides}{' (diagnostic)' if setup.diagnostic else ''}")
        return

    # Every compiled setup recompiles GPT.forward / GPT.hidden for its own model: past the default
    # limit Dynamo would fall back to eager and time something train never runs.
    torch._dynamo.config.recompile_limit = 64
    setups = pick_setups(args.only)
    try:
        base = load_params(args.params).model_dump()
    except LibrarianError as error:
        raise SystemExit(f"error: {error}") from None
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as work:
        work = Path(work)
        tokens = write_random_tokens(work / "tokens", setup_params(base, SETUPS[0]))
        runs, failures = warm_up(setups, base, tokens, work, args)
        if BASELINE not in runs:
            raise SystemExit(f"the baseline failed: {failures[BASELINE]}")
        rates, peaks = timed_rounds(runs, args)
    print(json.dumps(report(runs, failures, rates, peaks, args), indent=2))


if __name__ == "__main__":
    main()
