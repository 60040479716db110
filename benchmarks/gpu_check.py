"""The GPU check: what the card's GPU must do right, in one command, one line per check.

    python benchmarks/gpu_check.py                  # on the GPU (cuda), at most ~5 minutes
    python benchmarks/gpu_check.py --device cpu --steps 8 --bench-steps 2 --no-compile   # CI, briefly

Data: the stories the project ships in tests/fixtures (no network), cleaned into parquet splits,
a BPE trained on them and tokenized by the pipeline's own functions. The model is the card's
(params.yaml's model section, its vocab the tokenizer's), trained with train.amp as the precision
policy resolves it on the device (librarian/core/precision.py), deterministic (train.deterministic).

Checks (PASS or FAIL, one line each; exit 1 on any failure):
  train_twice      two runs of --steps steps give bit-identical weights
  kill_resume      a run killed with SIGKILL after a checkpoint, then rerun, resumes and ends with
                   the weights of the uninterrupted run, bit for bit
  eval_devices     the test loss on the device and on the CPU agree within 2e-3
  sampling         seeded sampling repeats; the cached and uncached paths give the same text
  serve_engine     one request through serve's batch engine on the device gives greedy decoding's tokens
  export           the transformers export's logits on the device equal ours (max |diff| <= 1e-3)
Figures (INFO lines): the card model's training tokens/s on the device, eager, fused loss,
compiled (train.compile), compiled with fused loss, each the median of --bench-rounds rounds of
--bench-steps steps (the loss read each step: the GPU has finished the step when it is timed).
CUDA graphs are not tried.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import cycled_step  # benchmarks/common.py: its folder is on sys.path when run
from librarian.core.config import Params, parse_params, read_yaml
from librarian.data.sources import read_shard
from librarian.data.tokenizer import save_tokenizer, train_tokenizer
from librarian.data.tokens import tokenize_corpus
from librarian.data.windows import epoch_order
from librarian.evaluation.evaluate import evaluate_model
from librarian.inference.batching import Engine
from librarian.inference.generate import GenerationOptions, Generator, generate_ids
from librarian.model.checkpoint import load_weights
from librarian.training.train import TrainPaths, build_trainer, train

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tinystories"
EVAL_TOLERANCE = 2e-3
EXPORT_TOLERANCE = 1e-3
PROMPT = "Once upon a time, a little girl named Lily"
# The throughput setups: train params over the card's execution.
SETUPS = {"eager": {}, "fused_loss": {"train.fused_loss": True}, "compiled": {"train.compile": True},
          "compiled_fused_loss": {"train.compile": True, "train.fused_loss": True}}


# --- data and params -------------------------------------------------------------------------------


def prepare_data(work: Path, params: Params) -> tuple[Path, Path]:
    """The fixture's stories as clean splits (train; val and test halves of its validation file), a
    tokenizer trained on train, and the token files: (tokens folder, tokenizer.json)."""
    train_stories = read_shard(FIXTURE / "train-sample.txt.gz")
    held_out = read_shard(FIXTURE / "validation-sample.txt.gz")
    half = len(held_out) // 2
    clean = work / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    for split, stories in {"train": train_stories, "val": held_out[:half], "test": held_out[half:]}.items():
        pq.write_table(pa.table({"text": stories}), clean / f"{split}.parquet")
    tokenizer_path = work / "tokenizer.json"
    save_tokenizer(train_tokenizer(train_stories, params.tokenizer), tokenizer_path)
    tokens = work / "tokens"
    tokenize_corpus(clean, tokenizer_path, tokens, params.tokenize.chunk_stories)
    return tokens, tokenizer_path


def card_params(device: str, steps: int, checkpoint_every: int = 0, **overrides) -> Params:
    """params.yaml with the card's execution on `device`, for `steps` optimizer steps, deterministic."""
    raw = read_yaml((ROOT / "params.yaml").read_text())
    settings = {"train.device": device, "train.amp": True, "train.deterministic": True, "train.compile": False,
                "train.fused_loss": False, "model.attention": "manual", "train.max_steps": steps,
                "train.max_tokens": 0, "train.max_epochs": 10_000, "train.patience": 10_000,
                "train.checkpoint_every": checkpoint_every, "train.threads": 0, **overrides}
    for key, value in settings.items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_params(raw, source="gpu_check")


def run_paths(folder: Path) -> TrainPaths:
    return TrainPaths(model=folder / "model", curves=folder / "curves", speed=folder / "speed", state=folder / "state")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the checks: each returns (passed, what it saw) -------------------------------------------------


def check_train_twice(work: Path, tokens: Path, params: Params) -> tuple[bool, str]:
    digests = []
    for run in ("a", "b"):
        train(params, tokens, run_paths(work / run))
        digests.append(sha256(work / run / "model" / "last.safetensors"))
    return digests[0] == digests[1], f"{params.train.max_steps} steps twice: last weights {digests[0][:12]} and {digests[1][:12]}"


def check_kill_resume(work: Path, tokens: Path, args) -> tuple[bool, str]:
    """A worker process trains with a checkpoint every `every` steps; at step every + every // 2 it
    is killed with SIGKILL (the steps since the checkpoint are lost), then rerun to the end."""
    every = max(1, args.steps // 4)
    kill_at = every + max(1, every // 2)
    folder = work / "killed"
    command = [sys.executable, __file__, "--worker-train", str(folder), "--tokens", str(tokens), "--device",
               args.device, "--steps", str(args.steps), "--checkpoint-every", str(every)]
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in worker.stdout:  # the worker prints "step N" after each step: kill on that sign
        if line.strip() == f"step {kill_at}":
            worker.send_signal(signal.SIGKILL)
            break
    worker.wait()
    if worker.returncode != -signal.SIGKILL:
        return False, f"the worker was not killed mid-run (exit {worker.returncode})"
    rerun = subprocess.run(command, capture_output=True, text=True)
    if rerun.returncode:
        return False, f"the rerun failed: {rerun.stderr.strip().splitlines()[-1:]}"
    # The state is saved every `every` steps and at each epoch's end: the rerun resumes from the last.
    resumed = re.search(r"resuming at .*\((\d+) steps done\)", rerun.stdout)
    same = sha256(folder / "model" / "last.safetensors") == sha256(work / "a" / "model" / "last.safetensors")
    where = f"resumed from step {resumed[1]}" if resumed else "NOT resumed"
    return bool(resumed) and 0 < int(resumed[1]) < kill_at and same, (
        f"killed at step {kill_at}, {where}: weights {'bit-identical to' if same else 'DIFFERENT from'} the uninterrupted run")


def worker_train(args) -> None:
    """--worker-train: the run check_kill_resume kills; says each step on stdout."""
    def say(trainer):
        print(f"step {trainer.progress.global_step}", flush=True)

    params = card_params(args.device, args.steps, args.checkpoint_every)
    paths = run_paths(Path(args.worker_train))
    build_trainer(params, args.tokens, paths, after_step=say).run()


def check_eval(model_path: Path, tokens: Path, params: Params, device: str) -> tuple[bool, str]:
    here = evaluate_model(model_path, tokens, params, device)["loss"]
    cpu = evaluate_model(model_path, tokens, params, "cpu")["loss"]
    gap = abs(here - cpu)
    return gap <= EVAL_TOLERANCE, f"test loss {here:.5f} on {device}, {cpu:.5f} on cpu: |diff| {gap:.2e} (<= {EVAL_TOLERANCE})"


def check_sampling(generator: Generator) -> tuple[bool, str]:
    options = GenerationOptions(temperature=0.8, top_k=50, max_new_tokens=60, seed=1234)
    first, again = generator.complete(PROMPT, options), generator.complete(PROMPT, options)
    uncached = generator.complete(PROMPT, dataclasses.replace(options, use_cache=False))
    ok = first == again == uncached and len(first) > 0
    return ok, (f"seeded sample {'repeats' if first == again else 'DIFFERS'}; uncached path "
                f"{'gives the same text' if first == uncached else 'DIFFERS'} ({len(first)} characters)")


def check_serve_engine(generator: Generator) -> tuple[bool, str]:
    options = GenerationOptions(temperature=0.0, max_new_tokens=40)
    prompt, stop = generator.encode(PROMPT), (generator.eot,)
    expected = list(generate_ids(generator.model, prompt, options, stop))
    got, done = [], threading.Event()
    engine = Engine(generator.model, slots=4)
    try:
        engine.submit(prompt, options, stop, lambda token: done.set() if token is None else got.append(token))
        finished = done.wait(timeout=120)
    finally:
        engine.close()
    return finished and got == expected, f"{len(got)} tokens from the engine, {'equal to' if got == expected else 'NOT'} greedy decoding's"


def check_export(model_path: Path, tokenizer_path: Path, work: Path, device: str) -> tuple[bool, str]:
    from transformers import GPT2LMHeadModel

    from librarian.inference.export import export_hf

    out = export_hf(model_path, tokenizer_path, work / "hf")
    ours = load_weights(model_path, device).eval()
    theirs = GPT2LMHeadModel.from_pretrained(out).to(device).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, ours.config.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (ours(ids.to(device))[0] - theirs(ids.to(device)).logits).abs().max().item()
    return gap <= EXPORT_TOLERANCE, f"max |logit diff| {gap:.2e} on {device} (<= {EXPORT_TOLERANCE})"


# --- figures ---------------------------------------------------------------------------------------


def tokens_per_s(work: Path, tokens: Path, device: str, name: str, overrides: dict, args) -> str:
    params = card_params(device, 10**9, **overrides)
    trainer = build_trainer(params, tokens, run_paths(work / f"bench_{name}"))
    trainer.model.train()
    order = epoch_order(len(trainer.train_windows), params.seed, 0)
    started = time.perf_counter()
    cycled_step(trainer, order)  # compiles, when train.compile
    warmup = time.perf_counter() - started
    rounds = []
    for _ in range(args.bench_rounds):
        taken, started = 0, time.perf_counter()
        for _ in range(args.bench_steps):
            taken += cycled_step(trainer, order)[1]
        rounds.append(taken / (time.perf_counter() - started))
    return (f"{name}: {statistics.median(rounds):,.0f} tokens/s ({trainer.runtime.precision.name}, "
            f"first step {warmup:.1f} s)")


# --- the command -----------------------------------------------------------------------------------


@contextlib.contextmanager
def details_to(log: Path):
    """What the library prints (its stage lines, progress bars) goes to `log`: the console gets one line a check."""
    with log.open("a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        yield


def report(results: list[bool], name: str, check: Callable[[], tuple[bool, str]], log: Path) -> None:
    started = time.perf_counter()
    try:
        with details_to(log):
            passed, seen = check()
    except Exception as exc:  # a crash is a failed check, named, and the others still run
        passed, seen = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    results.append(passed)
    print(f"{'PASS' if passed else 'FAIL'} {name}: {seen} [{time.perf_counter() - started:.1f} s]", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cpu, or e.g. cuda:1")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run (default 300)")
    parser.add_argument("--bench-steps", type=int, default=30, help="timed steps a round (default 30)")
    parser.add_argument("--bench-rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled throughput setups")
    parser.add_argument("--work", type=Path, help="a folder for the data and runs (default: a temporary one)")
    parser.add_argument("--worker-train", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-every", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_train:
        worker_train(args)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device}, but torch {torch.__version__} sees no CUDA GPU here; "
              "run it on a GPU machine, or with --device cpu", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        return run_checks(args, Path(args.work or tmp))


def run_checks(args, work: Path) -> int:
    device = args.device
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    print(f"INFO device: {device} ({name}), torch {torch.__version__}, {args.steps} training steps", flush=True)
    params = card_params(device, args.steps)
    log = work / "details.log"
    with details_to(log):
        tokens, tokenizer_path = prepare_data(work, params)
    results: list[bool] = []
    report(results, "train_twice", lambda: check_train_twice(work, tokens, params), log)
    report(results, "kill_resume", lambda: check_kill_resume(work, tokens, args), log)
    model_path = work / "a" / "model" / "model.safetensors"
    report(results, "eval_devices", lambda: check_eval(model_path, tokens, params, device), log)
    generator = Generator.load(model_path, tokenizer_path, device=device)
    report(results, "sampling", lambda: check_sampling(generator), log)
    report(results, "serve_engine", lambda: check_serve_engine(generator), log)
    report(results, "export", lambda: check_export(model_path, tokenizer_path, work, device), log)
    setups = {k: v for k, v in SETUPS.items() if not (args.no_compile and "train.compile" in v)}
    for setup, overrides in setups.items():
        try:
            with details_to(log):
                figure = tokens_per_s(work, tokens, device, setup, overrides, args)
        except Exception as exc:  # a figure that cannot be had is said, not fatal
            figure = f"{setup}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        print(f"INFO tokens/s {figure}", flush=True)
    failed = results.count(False)
    print(f"{'FAIL' if failed else 'PASS'} gpu_check: {len(results) - failed}/{len(results)} checks passed on {device}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
