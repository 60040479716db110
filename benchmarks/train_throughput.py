"""Benchmark training throughput (tokens/s) of the train stage's own step on this CPU.

    . .venv/bin/activate
    python benchmarks/train_throughput.py                       # every setup, ~10 minutes
    python benchmarks/train_throughput.py --rounds 9 --steps 6  # steadier figures, slower
    python benchmarks/train_throughput.py --only compile_fused_loss,ddp2_compile_fused_loss
    python benchmarks/train_throughput.py --profile --only recipe_compile_fused_loss  # + where a step's time goes
    python benchmarks/train_throughput.py --list                # the setups and the params they set

What it times: librarian.training.train.Trainer.step, the training loop's own step -- train_step
(the learning rate from lr_at, the
forward and loss through TrainingLoss (with train.fused_loss / train.compile as the params say),
autocast as train.amp, backward, the AdamW that build_optimizer makes, zero_grad) and the loop's
accounting, so that tokens/s credits the tokens of the batch each step took (fewer than the full
batch during a batch warmup, train.batch_warmup_tokens) -- on a Trainer
built from the project's params.yaml (--params), so the benchmark runs exactly what `train` runs
and cannot drift from it. Each setup is params.yaml with a few keys overridden (validated by
librarian.core.config like any params file); the batch, lr, decay and model are params.yaml's. The
Trainer reads a train.bin / val.bin pair of random token ids of the tokenizer's vocab, written
with their sidecars in a temporary folder: speed does not depend on what the tokens say.

Setups -- every one a params.yaml the train stage accepts:
  * card_eager_amp is THE BASELINE of every ratio: the card's execution (model.attention manual,
    train.amp true, train.compile false, train.fused_loss false, train.threads 0).
  * the others change the keys --list shows: train.amp false; model.attention sdpa;
    train.fused_loss; train.compile; train.threads 1 or 2, and their combinations. The card's
    model (model.dropout 0.2) throughout.
  * ddp2_*: two processes of one thread each, DistributedDataParallel over gloo, each taking half
    of every batch: the train stage under `torchrun --nproc_per_node=2` (docs/scale.md, "Scale out").
    This script starts the two workers itself (itself with --worker, RANK / WORLD_SIZE set as
    torchrun sets them) and steps them in the same interleaved rounds: while they step, this
    process waits on their pipes; while this process steps, they wait on theirs.
  * recipe_*: model.dropout 0, the speedrun recipe's model (benchmarks/speedrun.py), not the
    card's: their own goal, never named the fastest card setup.
  * *_keep_memory: not params but a process setting, measured for what it would give the train
    stage: the setup in a worker process (as ddp2_*) whose glibc malloc keeps the memory it frees
    (keep_freed_memory). By default blocks above 32 MB are mmapped and unmapped every time, so
    each eager step faults in fresh pages again.
Every setup runs on the CPU (train.device cpu); train.threads 0 means torch's default, the
thread count this process started with.

Noise: the machine may be shared, so every setup is built and warmed up first (train.compile
compiles there; its warmup_s depends on Inductor's on-disk cache), then timed in interleaved
rounds, each running --steps steps of every setup in turn (after one untimed step: the thread
pool may have just been resized, the caches hold the other setups' data). tokens/s is a setup's
median over the rounds; its ratio is the median of its per-round ratios to the baseline's tokens/s
in that round. The load average before and after is in the report.

Peak and MFU: fp32 and bf16 square matmuls (--matmul-size) are timed in every round; the best is
the achievable GFLOP/s. MFU = FLOPs per token x tokens/s / the peak of the setup's precision
(bf16 under train.amp), FLOPs per token being nanoGPT's estimate_mfu: 6 N + 12 n_layer d_model
context, N = GPT.n_params() (the tied embedding is the lm_head's matmul).

Profile (--profile): after the rounds, --profile-steps steps of each in-process setup named by
--profile-setups run under torch.profiler; every op's self time goes to a category (PROFILE_RULES:
the innermost op of its call stack whose name says what it is; Inductor's fused kernels count
once, under the first of softmax > dropout > norm > GELU their name lists), and "Python /
dispatch overhead" is the step's wall time minus the self time of every ATen op and kernel.
A table goes to stderr, the figures to the report's "profile".

Precision: train.amp resolves as in the train stage (librarian/core/precision.py): bf16 autocast on
a CPU with native bf16, float32 on one without. The report names the CPU's capability, whether it
has native bf16 (and LIBRARIAN_CPU_BF16 where that forces the policy: LIBRARIAN_CPU_BF16=0 shows a
bf16 CPU's float32 path), and the precision each setup ran in.

Prints a JSON report (progress goes to stderr). Goals: the fastest card setup >= 3.5x the
baseline, the fastest recipe setup (dropout 0) >= 5x the baseline; on a CPU without native bf16,
the card's defaults (card_eager_amp) >= 0.9x card_eager_fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import cpu_name, cpu_precision, cycled_step  # benchmarks/common.py: its folder is on sys.path when run
from librarian.core.config import Params, load_params, parse_params
from librarian.data.windows import epoch_order
from librarian.core.errors import LibrarianError
from librarian.core.io import write_json
from librarian.core.precision import resolve_precision
from librarian.core.threads import available_cores
from librarian.training.train import TrainPaths, build_trainer

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
GOAL_CARD_SPEEDUP = 3.5  # the fastest setup of the card's model (dropout 0.2)
GOAL_RECIPE_SPEEDUP = 5.0  # the fastest setup of the recipe's model (dropout 0)
TRAIN_BATCHES = 8  # distinct batches in the random train split: the step cycles through them


# --- what is compared ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One params.yaml: the baseline's keys with these overridden (dotted names)."""

    name: str
    overrides: dict = field(default_factory=dict)
    recipe: bool = False  # model.dropout 0: the speedrun recipe's model, not the card's
    processes: int = 1  # > 1: DistributedDataParallel workers, one thread each
    keep_memory: bool = False  # run in worker processes whose malloc keeps freed memory (keep_freed_memory)

    @property
    def in_workers(self) -> bool:
        return self.processes > 1 or self.keep_memory


BASELINE = "card_eager_amp"
FP32 = "card_eager_fp32"
PEAK_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GOAL_AMP_OVER_FP32 = 0.9  # on a CPU without native bf16 (issue 31)
# The card's execution, whatever params.yaml says for these keys; the rest of params.yaml is kept.
CARD = {"model.attention": "manual", "train.amp": True, "train.compile": False, "train.fused_loss": False,
        "train.threads": 0, "train.device": "cpu"}
_FAST = {"model.attention": "sdpa", "train.fused_loss": True, "train.compile": True}
_COMPILED = {"train.fused_loss": True, "train.compile": True}  # manual attention
_ONE = {"train.threads": 1}
_RECIPE = {"model.dropout": 0.0}
# The best recipe's execution (benchmarks/speedrun.py): manual attention, fused loss, compile, dropout 0.
BEST_RECIPE = "recipe_compile_fused_loss"
SETUPS = [
    Setup(BASELINE),
    Setup(FP32, {"train.amp": False}),
    Setup("sdpa", {"model.attention": "sdpa"}),
    Setup("fused_loss", {"train.fused_loss": True}),
    Setup("sdpa_fused_loss", {"model.attention": "sdpa", "train.fused_loss": True}),
    Setup("compile", {"train.compile": True}),
    Setup("compile_sdpa", {"model.attention": "sdpa", "train.compile": True}),
    Setup("compile_sdpa_fused_loss", _FAST),
    Setup("compile_fused_loss", _COMPILED),
    Setup("threads_1", _ONE),
    Setup("threads_2", {"train.threads": 2}),
    Setup("compile_fused_loss_threads_1", _COMPILED | _ONE),
    Setup("ddp2_eager", _ONE, processes=2),
    Setup("ddp2_compile_sdpa_fused_loss", _FAST | _ONE, processes=2),
    Setup("ddp2_compile_fused_loss", _COMPILED | _ONE, processes=2),
    Setup("recipe_compile_sdpa_fused_loss", _FAST | _RECIPE, recipe=True),
    Setup(BEST_RECIPE, _COMPILED | _RECIPE, recipe=True),
    Setup("recipe_ddp2_compile_sdpa_fused_loss", _FAST | _RECIPE | _ONE, recipe=True, processes=2),
    Setup("recipe_ddp2_compile_fused_loss", _COMPILED | _RECIPE | _ONE, recipe=True, processes=2),
    # Not params: the same setups in a process whose malloc keeps the memory it frees (see keep_freed_memory).
    Setup("card_eager_amp_keep_memory", keep_memory=True),
    Setup("fused_loss_keep_memory", {"train.fused_loss": True}, keep_memory=True),
    Setup("ddp2_eager_keep_memory", _ONE, processes=2, keep_memory=True),
    Setup("compile_fused_loss_keep_memory", _COMPILED, keep_memory=True),
]
SETUP_BY_NAME = {s.name: s for s in SETUPS}


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
    """A real Trainer for one setup, stepped by the training loop's own Trainer.step."""

    processes = 1

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
        self.tokens_per_step = self.trainer.tokens_per_step
        self.config, self.n_params = self.trainer.model.config, self.trainer.model.n_params()
        self.warmup_s = 0.0
        self.step_s: list[float] = []  # a step's mean time in each timed round

    def warm_up(self, steps: int) -> float:
        return [self.step() for _ in range(steps)][-1][0]

    def step(self) -> tuple[float, int]:
        """One optimizer step as the training loop takes it: its loss and the tokens of its batch."""
        return cycled_step(self.trainer, self.order)

    def time_steps(self, steps: int) -> tuple[float, int]:
        """Seconds for `steps` training steps and the tokens they took, after one untimed step: the
        thread pool may have just been resized and the caches hold the previous setup's data."""
        torch.set_num_threads(self.threads)
        self.step()
        tokens, start = 0, time.perf_counter()
        for _ in range(steps):
            tokens += self.step()[1]
        return time.perf_counter() - start, tokens

    def close(self) -> None:
        pass


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory a process frees instead of handing it back to the kernel:
    no mmap per large block (the default mmaps anything above 32 MB, such as the card's 131 MB of
    logits) and no trimming of the heap. Without it, every step of the eager card path faults in
    ~650 MB of fresh zeroed pages again (benchmarks: ~166,000 minor page faults a step)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)):
        raise RuntimeError("mallopt refused the thresholds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """A setup in its own processes: `setup.processes` copies of this script (--worker), ranks of one
    process group as torchrun would start them (one process: no group), each a Run of the setup;
    they step when told to on stdin and answer on stdout, so that they sit idle (blocked on a pipe)
    while other setups are timed."""

    def __init__(self, setup: Setup, params: Params, tokens: Path, work: Path, args):
        self.setup, self.params, self.processes = setup, params, setup.processes
        self.threads = params.train.threads or args.threads
        env = os.environ | {"WORLD_SIZE": str(self.processes), "LOCAL_WORLD_SIZE": str(self.processes),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env = env | ({"TRAIN_THROUGHPUT_KEEP_MEMORY": "1"} if setup.keep_memory else {})
        command = [sys.executable, __file__, "--worker", setup.name, "--params", str(args.params),
                   "--tokens", str(tokens), "--work", str(work / setup.name), "--warmup", str(args.warmup)]
        self.procs = [subprocess.Popen(command, env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for rank in range(self.processes)]
        try:
            replies = [self._read(proc) for proc in self.procs]  # built and warmed up
        except Exception:
            for proc in self.procs:  # a rank that failed leaves the others waiting for it
                proc.kill()
                proc.wait()
            raise
        info = json.loads(replies[0])
        self.tokens_per_step, self.n_params, self.loss = info["tokens_per_step"], info["n_params"], info["loss"]
        self.config = build_config(info["config"])
        self.warmup_s = 0.0
        self.step_s: list[float] = []

    @staticmethod
    def _read(proc) -> str:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {proc.wait()}")
        return line.strip()

    def _tell(self, line: str) -> None:
        for proc in self.procs:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def warm_up(self, steps: int) -> float:
        return self.loss  # the workers warmed up as they started

    def time_steps(self, steps: int) -> tuple[float, int]:
        """Seconds for `steps` DDP steps, the slowest rank's time (they meet at every all-reduce), and
        the tokens they took (every rank counts the whole batch, all ranks' shares)."""
        self._tell(f"steps {steps}")
        replies = [self._read(proc).split() for proc in self.procs]
        return max(float(seconds) for seconds, _ in replies), int(replies[0][1])

    def close(self) -> None:
        self._tell("quit")
        for proc in self.procs:
            proc.wait(timeout=60)


def build_config(config: dict):
    from librarian.core.config import GPTConfig

    return GPTConfig(**config)


def worker(args) -> None:
    """--worker: one rank of a DDP setup (see Workers). stdout carries the protocol only."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # anything else a library prints goes to stderr
    if os.environ.get("TRAIN_THROUGHPUT_KEEP_MEMORY"):
        keep_freed_memory()
    torch._dynamo.config.recompile_limit = 64
    setup = SETUP_BY_NAME[args.worker]
    params = setup_params(load_params(args.params).model_dump(), setup)
    run = Run(setup, params, args.tokens, args.work / f"rank{os.environ['RANK']}", torch.get_num_threads())
    loss = run.warm_up(args.warmup)
    protocol.write(json.dumps({"tokens_per_step": run.tokens_per_step, "n_params": run.n_params, "loss": loss,
                               "config": run.config.to_dict()}) + "\n")
    protocol.flush()
    while True:
        command = sys.stdin.readline().split()
        if not command or command[0] == "quit":
            break
        seconds, tokens = run.time_steps(int(command[1]))
        protocol.write(f"{seconds} {tokens}\n")
        protocol.flush()


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


def flops_per_token(run: Run | Workers) -> int:
    """Training FLOPs per token (nanoGPT's estimate_mfu): 6 N + 12 L d T."""
    config = run.config
    return 6 * run.n_params + 12 * config.n_layer * config.d_model * config.context_length


# --- the profile ---------------------------------------------------------------------------------

OVERHEAD = "Python / dispatch overhead"
OTHER = "other ops (residual adds, scaling, reshapes)"
# An op's self time goes to the category of the innermost event of its call stack (the op itself
# first, then its callers) whose name matches one of these, in this order of precedence.
PROFILE_RULES = [
    ("optimizer step", r"^Optimizer\.(step|zero_grad)"),
    ("matmuls", r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm|addbmm)$|^mkldnn|(Mm|Addmm|Bmm|Linear)Backward"),
    ("loss (cross-entropy / fused loss)", r"cross_entropy|nll_loss|log_softmax|LogSoftmaxBackward|NllLoss"
                                          r"|LinearCrossEntropy"),
    ("attention (softmax, masking, sdpa)", r"softmax|masked_fill|MaskedFill|scaled_dot_product|flash_attention"),
    ("dropout RNG", r"dropout|bernoulli|DropoutBackward|bitwise_xor"),  # bitwise_xor: the hashed masks
    ("norms", r"layer_norm|rms_norm|LayerNormBackward|RmsNormBackward"),
    ("GELU", r"gelu|GeluBackward|silu|relu"),
    ("embedding", r"embedding|EmbeddingBackward"),
    ("casts and copies", r"^aten::(_to_copy|to|copy_|clone|contiguous)$|ToCopyBackward|CloneBackward"),
]
_COMPILED_RULES = [re.compile(pattern) for _, pattern in PROFILE_RULES]


def is_op(name: str) -> bool:
    """An ATen op or a compiled kernel: what does the work (the rest is Python, autograd and wrappers)."""
    return name.startswith(("aten::", "mkldnn::")) or "cpp_fused" in name or "cpp_kernel" in name


def category(event) -> str:
    while event is not None:
        for (name, _), pattern in zip(PROFILE_RULES, _COMPILED_RULES):
            if pattern.search(event.name):
                return name
        event = event.cpu_parent
    return OTHER


def profile_run(run: Run, steps: int, unprofiled_step_ms: float) -> dict:
    """Where `steps` steps of a setup spend their time (ms a step, per category)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(run.threads)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run.step()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    per_category, per_op = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if is_op(event.name):
            per_category[category(event)] += event.self_cpu_time_total / 1000 / steps
            per_op[event.name] += event.self_cpu_time_total / 1000 / steps
    per_category[OVERHEAD] = wall_ms - sum(per_category.values())
    order = [name for name, _ in PROFILE_RULES] + [OTHER, OVERHEAD]
    return {
        "step_ms_profiled": round(wall_ms, 1), "step_ms_unprofiled": round(unprofiled_step_ms, 1),
        "threads": run.threads,
        "categories": {name: {"ms": round(per_category[name], 1), "pct": round(100 * per_category[name] / wall_ms, 1)}
                       for name in order if name in per_category},
        "top_ops_ms": {name: round(ms, 1) for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]},
    }


def print_profiles(profiles: dict) -> None:
    names = list(profiles)
    categories = list(dict.fromkeys(c for p in profiles.values() for c in p["categories"]))
    print("\nprofile: ms a step (% of the profiled step)", file=sys.stderr)
    width = max(len(c) for c in categories) + 2
    print(" " * width + "".join(f"{n[:30]:>32}" for n in names), file=sys.stderr)
    for c in categories:
        cells = []
        for n in names:
            entry = profiles[n]["categories"].get(c)
            cells.append(f"{entry['ms']:>9.1f} ms ({entry['pct']:>5.1f} %)" if entry else "")
        print(f"{c:<{width}}" + "".join(f"{cell:>32}" for cell in cells), file=sys.stderr)
    print(f"{'step (profiled / not)':<{width}}" + "".join(
        f"{profiles[n]['step_ms_profiled']:>17.1f} / {profiles[n]['step_ms_unprofiled']:>6.1f} ms" for n in names),
        file=sys.stderr)


# --- the benchmark -------------------------------------------------------------------------------


def warm_up(setups: list[Setup], base: dict, tokens: Path, work: Path, args) -> tuple[dict, dict]:
    """Build and warm up every setup (train.compile compiles here); failures are reported, not fatal."""
    runs, failures = {}, {}
    for setup in setups:
        start = time.perf_counter()
        try:
            params = setup_params(base, setup)
            if setup.in_workers:
                run = Workers(setup, params, tokens, work, args)
            else:
                run = Run(setup, params, tokens, work, args.threads)
            loss = run.warm_up(args.warmup)
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


def timed_rounds(runs: dict, args) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleaved rounds: every setup's tokens/s per round, and the best matmul peaks."""
    rates = {name: [] for name in runs}
    # The peak of each precision some setup runs in: bf16 is not timed where the policy trains in
    # float32 (emulated, it would take minutes a round on an AVX2 CPU).
    peaks = dict.fromkeys(sorted({run_precision(run) for run in runs.values()}), 0.0)
    for round_no in range(args.rounds):
        torch.set_num_threads(args.threads)
        for name in peaks:
            peaks[name] = max(peaks[name], matmul_gflops(PEAK_DTYPES[name], args.matmul_size))
        for name, run in runs.items():
            seconds, tokens = run.time_steps(args.steps)
            rates[name].append(tokens / seconds)
            run.step_s.append(seconds / args.steps)
        line = ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items())
        print(f"round {round_no + 1}/{args.rounds} tokens/s: {line}", file=sys.stderr, flush=True)
    return rates, peaks


def setup_entry(run: Run | Workers, rates: list[float], base_rates: list[float], peaks: dict) -> dict:
    """One setup's figures: median tokens/s, ratio to the baseline, MFU against its precision's peak."""
    tokens_per_s = statistics.median(rates)
    precision = run_precision(run)
    return {
        "tokens_per_s": round(tokens_per_s),
        "ratio_vs_baseline": round(statistics.median(r / b for r, b in zip(rates, base_rates)), 3),
        "mfu": round(flops_per_token(run) * tokens_per_s / (peaks[precision] * 1e9), 4),
        "precision": precision,
        "mfu_of_peak": precision,
        "best_round_tokens_per_s": round(max(rates)),
        "step_ms": round(statistics.median(run.step_s) * 1000, 1),
        "warmup_s": round(run.warmup_s, 1),
        "processes": run.processes,
        "threads": run.threads,
        "dropout": run.params.model.dropout,
        "n_params": run.n_params,
        "params_set": run.setup.overrides,
        "recipe": run.setup.recipe,
        "keep_memory": run.setup.keep_memory,
    }


def run_precision(run) -> str:
    """The precision the setup really trains in: train.amp as the policy resolves it on this CPU
    (workers are processes of this script on the same CPU, under the same environment)."""
    return resolve_precision("cpu", run.params.train.amp).name


def fastest(setups: dict, runs: dict, recipe: bool) -> str | None:
    names = [name for name, run in runs.items() if run.setup.recipe == recipe and name != BASELINE]
    return max(names, key=lambda name: setups[name]["ratio_vs_baseline"]) if names else None


def report(runs: dict, failures: dict, rates: dict, peaks: dict, loads: dict, profiles: dict, args) -> dict:
    baseline = runs[BASELINE]
    setups = {name: setup_entry(run, rates[name], rates[BASELINE], peaks) for name, run in runs.items()}
    card, recipe = fastest(setups, runs, recipe=False), fastest(setups, runs, recipe=True)
    tp = baseline.params.train
    goals = {}
    for label, name, goal in (("card", card, GOAL_CARD_SPEEDUP), ("recipe", recipe, GOAL_RECIPE_SPEEDUP)):
        if name:
            goals[f"fastest_{label}_setup"] = name
            goals[f"fastest_{label}_ratio_vs_baseline"] = setups[name]["ratio_vs_baseline"]
            goals[f"fastest_{label}_tokens_per_s"] = setups[name]["tokens_per_s"]
            goals[f"{label}_ge_{goal}x_baseline"] = setups[name]["ratio_vs_baseline"] >= goal
    if FP32 in setups:
        # The card's defaults (train.amp true) against float32: >= 0.9x where the CPU has no native
        # bf16 (the policy trains in float32 there); on a bf16 CPU the ratio is what it is.
        ratio = round(1 / setups[FP32]["ratio_vs_baseline"], 3)
        goals["card_amp_over_fp32"] = ratio
        goals["card_amp_precision"] = setups[BASELINE]["precision"]
        if setups[BASELINE]["precision"] == "fp32":
            goals[f"card_amp_ge_{GOAL_AMP_OVER_FP32}x_fp32"] = ratio >= GOAL_AMP_OVER_FP32
    return {
        "cpu": cpu_name(),
        "cores": available_cores(),
        "torch": torch.__version__,
        **cpu_precision(),
        "default_threads": args.threads,
        "load_average": loads,
        "params": str(args.params),
        "model": {"config": baseline.config.to_dict(), "n_params": baseline.n_params,
                  "batch_size": tp.batch_size, "grad_accum": tp.grad_accum,
                  "tokens_per_step": baseline.tokens_per_step,
                  "train_flops_per_token": flops_per_token(baseline)},
        "method": {"timed": "librarian.training.train.Trainer.step (train_step and the loop's accounting)",
                   "warmup_steps": args.warmup,
                   "timed_rounds": args.rounds, "steps_per_round": args.steps,
                   "untimed_steps_per_turn": 1,
                   "tokens_per_s": "median over the interleaved rounds of the tokens the steps took (a batch "
                                   "warmup's smaller batches as taken) over their time",
                   "ratio_vs_baseline": "median of the per-round ratios to the baseline",
                   "keep_memory": "*_keep_memory setups: a worker process of this script (as ddp2_*) that "
                                  "first calls mallopt(M_MMAP_THRESHOLD, 1 GB) and mallopt(M_TRIM_THRESHOLD, 2 GB)",
                   "ddp": "ddp2_* setups: 2 worker processes of this script (RANK/WORLD_SIZE as torchrun sets "
                          "them, gloo, train.threads 1 each, half of every batch each), stepped in the same "
                          "interleaved rounds; their time is the slower rank's; this process waits meanwhile",
                   "mfu": "train_flops_per_token x tokens/s / matmul peak of the setup's precision",
                   **({"profile": f"{args.profile_steps} steps under torch.profiler (CPU) after the rounds, Inductor "
                                  "kernels named (enable_kernel_profile); an op's self time goes to the category of "
                                  "the innermost event of its call stack matching PROFILE_RULES (a fused kernel "
                                  "counts once, by the first of softmax > dropout > norm > GELU in its name); "
                                  "overhead = wall time - self time of every ATen op and kernel (Python, autograd "
                                  "engine, compiled-graph wrappers, profiler)"} if profiles else {})},
        "baseline": f"{BASELINE}: params.yaml with the card's execution {CARD}",
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()} | {"size": args.matmul_size},
        "setups": setups,
        "failed": failures,
        "fastest": card,
        "goals": goals,
        **({"profile": profiles} if profiles else {}),
    }


def pick_setups(only: str) -> list[Setup]:
    """The setups named in --only (comma-separated), the baseline first; all of them by default."""
    wanted = set(filter(None, only.split(",")))
    unknown = wanted - set(SETUP_BY_NAME)
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
    parser.add_argument("--profile", action="store_true", help="profile setups after the rounds (see --profile-setups)")
    parser.add_argument("--profile-setups", default="",
                        help=f"comma-separated; default: {BASELINE}, {BEST_RECIPE} and the fastest in-process "
                             "card and recipe setups")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--list", action="store_true", help="list the setups and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one rank of a ddp2_* setup
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.list:
        print(f"{BASELINE:40} params.yaml with {CARD}")
        for setup in SETUPS[1:]:
            notes = ([f"{setup.processes} processes (DDP)"] * (setup.processes > 1) + ["recipe"] * setup.recipe
                     + ["malloc keeps freed memory"] * setup.keep_memory)
            print(f"{setup.name:40} {setup.overrides}{' (' + ', '.join(notes) + ')' if notes else ''}")
        return

    # Every compiled setup recompiles GPT.forward / GPT.hidden for its own model: past the default
    # limit Dynamo would fall back to eager and time something train never runs.
    torch._dynamo.config.recompile_limit = 64
    if args.profile:  # Inductor's kernels then show up in the profile by name (before anything compiles)
        torch._inductor.config.cpp.enable_kernel_profile = True
    setups = pick_setups(args.only)
    try:
        base = load_params(args.params).model_dump()
    except LibrarianError as error:
        raise SystemExit(f"error: {error}") from None
    loads = {"before": os.getloadavg()}
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as work:
        work = Path(work)
        tokens = write_random_tokens(work / "tokens", setup_params(base, SETUPS[0]))
        runs, failures = warm_up(setups, base, tokens, work, args)
        try:
            if BASELINE not in runs:
                raise SystemExit(f"the baseline failed: {failures[BASELINE]}")
            rates, peaks = timed_rounds(runs, args)
            loads["after"] = os.getloadavg()
            if args.profile:
                entries = {name: setup_entry(run, rates[name], rates[BASELINE], peaks) for name, run in runs.items()}
                wanted = list(filter(None, args.profile_setups.split(","))) or [
                    BASELINE, BEST_RECIPE,
                    *(fastest(entries, {n: r for n, r in runs.items() if isinstance(r, Run)}, recipe=flag)
                      for flag in (False, True))]
                for name in dict.fromkeys(n for n in wanted if n in runs and isinstance(runs[n], Run)):
                    profiles[name] = profile_run(runs[name], args.profile_steps, entries[name]["step_ms"])
                print_profiles(profiles)
        finally:
            for run in runs.values():
                run.close()
    print(json.dumps(report(runs, failures, rates, peaks, loads, profiles, args), indent=2))


if __name__ == "__main__":
    main()
