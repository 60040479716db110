"""Speedrun: training tokens and seconds to the model card's quality, per recipe, on this machine.

    . .venv/bin/activate
    python benchmarks/speedrun.py --tokens /path/to/a/real-run/data/tokens     # every recipe, ~20 min
    python benchmarks/speedrun.py --tokens ... --only speedrun --check-every 25
    python benchmarks/speedrun.py --list              # the recipes and the params they set
    python benchmarks/speedrun.py --command speedrun  # the `dvc exp run` command of a recipe

What it does, per recipe (params.yaml with the recipe's keys overridden, validated like any params):
  * trains with the train stage's own Trainer (librarian.training.train.build_trainer: same loop, optimizer,
    schedule and data order as `dvc repro`) on the token files of a real-data run (--tokens: the
    folder the tokenize stage wrote; train.bin, val.bin and test.bin are read);
  * every --check-every optimizer steps (and at the recipe's last step) it scores the validation
    split as the evaluate stage scores the test split (sliding windows of eval.stride, trunk in eval.amp's precision)
    and stops the run the first time the validation perplexity is <= --target (12.76, the card's);
  * it then scores the test split with the weights of that step: the confirmation.

Timing: training seconds are the wall time inside Trainer.train_step (forward, backward, optimizer;
the first step, which compiles under train.compile, is reported apart as well). The validation
checks, the test scoring and the per-epoch validation and checkpoints of the Trainer are outside it.
Tokens to the target do not depend on the machine; seconds do, so the ratio of the recipes is
measured in one invocation, on one machine, whose CPU, threads and torch are printed.

Prints a JSON report (progress to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import cpu_name  # benchmarks/common.py: its folder is on sys.path when run
from librarian.core.config import Params, load_params, parse_params, read_yaml
from librarian.data.windows import load_tokens
from librarian.core.errors import LibrarianError
from librarian.core.precision import resolve_precision
from librarian.evaluation.evaluate import metrics_from_counts, score_tokens
from librarian.core.threads import available_cores, resolve_threads
from librarian.training.train import Trainer, TrainPaths, build_trainer

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TARGET_PERPLEXITY = 12.76  # the model card's held-out perplexity (12.763)

# The best short recipe of docs/results.md before issue 13: 8 M tokens, cosine, AdamW.
BEST_SHORT = {
    "model.dropout": 0.0, "model.attention": "sdpa",
    "train.lr": 6e-3, "train.min_lr": 6e-4, "train.schedule": "cosine", "train.warmup_steps": 200,
    "train.weight_decay": 0.1, "train.decay_matrices_only": True, "train.beta2": 0.99, "train.grad_clip": 1.0,
    "train.fused_loss": True, "train.compile": True, "train.threads": 1, "train.max_tokens": 8_000_000,
}
# The speedrun recipe (docs/training.md, "Speedrun"): Muon on the blocks' matrices, warmup-stable-decay, the
# batch grown from 8 to 32 over the first 1 M tokens, 3 M tokens. The sweep behind it (3 M tokens
# each, `dvc exp show`) is in docs/training.md, "Speedrun". Its
# execution is the fastest for its model in benchmarks/train_throughput.py: manual attention
# (Inductor compiles it; PyTorch's CPU sdpa backward is slower) on both cores.
SPEEDRUN = BEST_SHORT | {
    "model.attention": "manual", "train.threads": 2,
    "train.optimizer": "muon", "train.muon_lr": 0.01, "train.schedule": "wsd", "train.decay_fraction": 0.3,
    "train.warmup_steps": 100, "train.batch_start": 8, "train.batch_warmup_tokens": 1_000_000,
    "train.max_tokens": 3_000_000,
}
RECIPES = {"best_short": BEST_SHORT, "speedrun": SPEEDRUN}
METHOD = ("train_s: wall time inside Trainer.train_step to the first validation check at or below the target "
          "(first step, which compiles, included; train_s_after_first_step without it); validation checks, test "
          "scoring, per-epoch validation and checkpoints excluded. Perplexities: evaluate-stage scoring, sliding "
          "windows of eval.stride. ratios: baseline recipe / recipe, in tokens and in train_s.")
BASELINE = "best_short"


def recipe_params(base: dict, overrides: dict, name: str) -> Params:
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        section, field = key.split(".")
        raw[section][field] = value
    raw["train"]["max_epochs"] = max(raw["train"]["max_epochs"], 100)  # the token cap ends the run, not epochs
    return parse_params(raw, source=f"recipe {name}")


def parse_overrides(pairs: list[str]) -> dict:
    """-S key=value pairs, values read as YAML (as dvc does): 16 is an int, 3.0e-3 a float, true a bool."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.count(".") != 1:
            raise SystemExit(f"error: -S {pair!r} must be section.key=value, e.g. -S train.batch_size=16")
        overrides[key] = read_yaml(value)
    return overrides


# Where the docs' commands read the real stories (the recipes' figures are theirs): a command without
# it would train on whatever data.source params.yaml names, the 370-story fixture after the demo.
REAL_STORIES = "../shared/data/tinystories"


def dvc_command(name: str, source: str = REAL_STORIES) -> str:
    """The `dvc exp run` command that trains this recipe in the pipeline, on the stories at `source`
    (docs/training.md shows it; tests/pipeline/test_doc_commands.py compares the two)."""
    settings = {"data.source": source, "data.fraction": 1.0} | RECIPES[name]
    flags = " ".join(f"-S {key}={str(value).lower() if isinstance(value, bool) else value}"
                     for key, value in settings.items())
    return f"dvc exp run -n {name.replace('_', '-')} {flags}"


class Watch:
    """The Trainer's after_step hook: validation checks every few steps, stop and confirm at the target."""

    def __init__(self, params: Params, tokens_dir: Path, target: float, check_every: int):
        self.params, self.target, self.check_every = params, target, check_every
        self.val, self.test = (load_tokens(tokens_dir / f"{split}.bin") for split in ("val", "test"))
        self.checks: list[dict] = []
        self.eval_s = 0.0
        self.first_step_s = None
        self.reached: dict | None = None

    def perplexity(self, trainer: Trainer, split) -> dict:
        """The evaluate stage's metrics of the model as it is now (sliding windows of eval.stride)."""
        model, ev = trainer.model, self.params.eval
        # Batches side by side on every core, as the evaluate stage does: the checks are not timed,
        # but they are most of the benchmark's wall time.
        threads = resolve_threads(ev.threads, model.config.d_model, "eval.threads", batched=True)
        counts = score_tokens(model, split.tokens, model.config.context_length, ev.stride, ev.batch_size,
                              trainer.device, precision=resolve_precision(trainer.device, ev.amp), threads=threads)
        return metrics_from_counts(counts, split.meta["utf8_bytes"])

    def __call__(self, trainer: Trainer) -> None:
        p = trainer.progress
        if self.first_step_s is None:
            self.first_step_s = trainer.step_seconds
        last = p.global_step >= trainer.total_steps or bool(p.stop_reason)
        if p.global_step % self.check_every and not last:
            return
        started = time.perf_counter()
        val = self.perplexity(trainer, self.val)
        check = {"step": p.global_step, "tokens": p.tokens_seen, "train_s": round(trainer.step_seconds, 2),
                 "val_perplexity": val["perplexity"]}
        self.checks.append(check)
        print(f"  step {p.global_step}: {p.tokens_seen:,} tokens, {trainer.step_seconds:.1f}s, "
              f"val perplexity {val['perplexity']:.3f}", file=sys.stderr, flush=True)
        if val["perplexity"] <= self.target and self.reached is None:
            test = self.perplexity(trainer, self.test)
            self.reached = check | {"val": val, "test": test}
            p.stop_reason = "target"
        self.eval_s += time.perf_counter() - started


def run_recipe(name: str, params: Params, tokens_dir: Path, work: Path, args) -> dict:
    torch.set_num_threads(params.train.threads or args.threads)
    watch = Watch(params, tokens_dir, args.target, args.check_every)
    paths = TrainPaths(model=work / name / "model", curves=work / name / "curves", speed=work / name / "speed",
                       state=work / name / "state")
    print(f"[{name}] training to val perplexity {args.target}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines: stdout is the JSON report's
        trainer = build_trainer(params, tokens_dir, paths, after_step=watch)
        trainer.run()
    reached = watch.reached
    result = {
        "reached": reached is not None,
        "tokens": reached["tokens"] if reached else None,
        "steps": reached["step"] if reached else None,
        "train_s": reached["train_s"] if reached else None,
        "first_step_s": round(watch.first_step_s or 0.0, 2),
        "val_perplexity": reached["val"]["perplexity"] if reached else min(c["val_perplexity"] for c in watch.checks),
        "test": reached["test"] if reached else None,
        "test_confirms": bool(reached) and reached["test"]["perplexity"] <= args.target,
        "planned_tokens": trainer.plan.tokens,
        "tokens_per_s": round(trainer.progress.tokens_seen / trainer.step_seconds) if trainer.step_seconds else None,
        "eval_s": round(watch.eval_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "n_params": trainer.model.n_params(),
        "params_set": RECIPES[name] | parse_overrides(args.overrides),
        "command": dvc_command(name),
        "checks": watch.checks,
    }
    if reached:
        result["train_s_after_first_step"] = round(reached["train_s"] - result["first_step_s"], 2)
    print(f"[{name}] {'reached' if reached else 'did NOT reach'} the target: "
          + (f"{result['tokens']:,} tokens, {result['steps']} steps, {result['train_s']:.1f}s of training, "
             f"test perplexity {reached['test']['perplexity']:.3f}" if reached
             else f"best val perplexity {result['val_perplexity']:.3f}"), file=sys.stderr, flush=True)
    return result


def ratios(results: dict) -> dict:
    """Each recipe against the baseline recipe: how many times fewer tokens and seconds it needed."""
    base = results.get(BASELINE)
    out = {}
    for name, r in results.items():
        if name == BASELINE or not (base and base["reached"] and r["reached"]):
            continue
        out[f"{BASELINE}/{name}"] = {"tokens": round(base["tokens"] / r["tokens"], 3),
                                     "train_s": round(base["train_s"] / r["train_s"], 3)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"),
                        help="a real-data run's token folder (train.bin, val.bin, test.bin)")
    parser.add_argument("--params", type=Path, default=PROJECT_PARAMS, help="the params every recipe starts from")
    parser.add_argument("--target", type=float, default=TARGET_PERPLEXITY, help="validation perplexity to reach")
    parser.add_argument("--check-every", type=int, default=50, help="optimizer steps between validation checks")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="the threads of train.threads 0 (torch's default)")
    parser.add_argument("--only", default="", help="comma-separated recipe names")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param in every recipe run, as `dvc exp run -S` (repeatable; YAML values)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--command", choices=sorted(RECIPES), help="print a recipe's dvc exp run command and exit")
    parser.add_argument("--source", default=REAL_STORIES,
                        help=f"the data.source of --command's run (default {REAL_STORIES}, the real stories)")
    args = parser.parse_args()
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name:12} {overrides}")
        return
    if args.command:
        print(dvc_command(args.command, args.source))
        return
    names = [n for n in args.only.split(",") if n] or list(RECIPES)
    unknown = set(names) - set(RECIPES)
    if unknown:
        raise SystemExit(f"error: unknown recipes: {', '.join(sorted(unknown))}; see --list")
    for split in ("train", "val", "test"):
        if not (args.tokens / f"{split}.bin").exists():
            raise SystemExit(f"error: {args.tokens / f'{split}.bin'} not found; pass --tokens with a real-data "
                             "run's data/tokens (run `dvc repro tokenize` first)")
    try:
        base = load_params(args.params).model_dump()
        extra = parse_overrides(args.overrides)
        recipes = {name: recipe_params(base, RECIPES[name] | extra, name) for name in names}
    except LibrarianError as error:
        raise SystemExit(f"error: {error}") from None
    torch._dynamo.config.recompile_limit = 64  # every recipe compiles its own model
    results = {}
    with tempfile.TemporaryDirectory(prefix="speedrun-") as work:
        for name, params in recipes.items():
            results[name] = run_recipe(name, params, args.tokens, Path(work), args)
    report = {
        "cpu": cpu_name(), "cores": available_cores(), "torch": torch.__version__,
        "target_val_perplexity": args.target, "check_every_steps": args.check_every,
        "tokens_dir": str(args.tokens), "method": METHOD, "recipes": results, "ratios": ratios(results),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
