"""Benchmark training throughput (tokens/s) of Librarian's default GPT on this CPU.

    . .venv/bin/activate
    python benchmarks/train_throughput.py                       # every setup, ~3 minutes
    python benchmarks/train_throughput.py --rounds 9 --steps 6  # steadier figures, slower
    python benchmarks/train_throughput.py --only compiled_fused_head_amp,reference_amp
    python benchmarks/train_throughput.py --list                # the setups and what they change

What it measures: full training steps (forward, backward, AdamW step, zero_grad) of the default
model (GPTConfig(): vocab 8000, context 128, 2 layers, 4 heads, width 128, feed-forward 256,
dropout 0.2; 1,305,600 parameters) at batch 32 x 128 tokens on random token ids, in train mode
(dropout on), as librarian/train.py does them: AdamW at lr 1e-4, decay 0.01.

Setups -- the same model and maths, only the execution differs:
  * baseline_amp is THE BASELINE of every ratio: the card's settings (manual attention with the
    explicit mask, eager, bf16 autocast as train.amp, AdamW(foreach=False) as build_optimizer).
    baseline_fp32 is the same without autocast.
  * candidates: fused scaled_dot_product_attention; AdamW foreach / fused; one thread; torch.compile
    of the model (mode default, max-autotune-no-cudagraphs) or of the whole step (with compiled
    autograd); and a fused head: the tied lm_head and the cross-entropy computed in row chunks,
    gradients included, so the 4096 x 8000 logits never exist whole (fused_head_*: GPT.hidden, then
    librarian/fused_loss.py, as train.fused_loss does it); aten_random: compiled dropout draws
    its masks with ATen's bernoulli_ (Inductor's fallback_random) instead of Inductor's Philox.
  * reference_amp: the same network from torch.nn.TransformerEncoderLayer (norm_first, GELU,
    batch_first, causal mask), same embeddings, tied head and final LayerNorm, eager, bf16 autocast.
  * diagnostic_*: not the card's model (dropout off); shown for what dropout costs, never "fastest".

Noise: the machine is shared, so every setup is built and warmed up first (torch.compile compiles
there; its warmup_s depends on Inductor's on-disk cache), then timed in interleaved rounds, each
running --steps steps of every setup in turn. tokens/s is a setup's median over the rounds; its
ratio is the median of its per-round ratios to the baseline's tokens/s in the same round.

Peak and MFU: fp32 and bf16 square matmuls (--matmul-size) are timed in every round; the best is
the achievable GFLOP/s. MFU = FLOPs per token x tokens/s / the peak of the setup's precision
(bf16 under autocast), FLOPs per token being nanoGPT's estimate_mfu: 6 N + 12 n_layer d_model
context, N = every parameter, the tied embedding included (it is the lm_head's matmul).

Prints a JSON report (progress goes to stderr). Goals: the fastest setup >= 3.5x the baseline,
and >= 25,000 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from librarian.fused_loss import linear_cross_entropy  # noqa: E402
from librarian.model import GPT, GPTConfig  # noqa: E402

BATCH = 32
GOAL_SPEEDUP = 3.5
GOAL_TOKENS_PER_S = 25_000


# --- what is compared ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One way of running the same training step."""

    name: str
    attention: str = "manual"  # manual | sdpa (GPTConfig.attention)
    amp: bool = True  # bf16 autocast, as train.amp
    optimizer: str = "loop"  # AdamW implementation: loop (foreach=False, as train.py) | foreach | fused
    threads: int = 0  # intra-op threads; 0: --threads
    compile_mode: str | None = None  # torch.compile the model (the trunk with fused_head) in this mode
    aten_random: bool = False  # compiled dropout masks from ATen's bernoulli_, not Inductor's Philox
    compile_step: bool = False  # torch.compile forward, backward (compiled autograd) and AdamW as one
    fused_head: bool = False  # lm_head + cross-entropy in row chunks (librarian.fused_loss)
    reference: bool = False  # the nn.TransformerEncoderLayer network
    dropout: float | None = None  # None: the card's 0.2; anything else makes a diagnostic

    def changes(self) -> dict:
        """The settings that differ from the baseline's."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "name" and getattr(self, f.name) != f.default}

    @property
    def candidate(self) -> bool:
        """The card's model and maths, so it may be named the fastest."""
        return not self.reference and self.dropout is None


BASELINE = "baseline_amp"
_FAST = {"attention": "sdpa", "optimizer": "fused"}
SETUPS = [
    Setup(BASELINE),
    Setup("baseline_fp32", amp=False),
    Setup("sdpa_amp", attention="sdpa"),
    Setup("foreach_adamw_amp", optimizer="foreach"),
    Setup("fused_adamw_amp", optimizer="fused"),
    Setup("one_thread_amp", threads=1),
    Setup("compiled_manual_amp", optimizer="fused", compile_mode="default"),
    Setup("compiled_sdpa_amp", **_FAST, compile_mode="default"),
    Setup("compiled_sdpa_fp32", **_FAST, amp=False, compile_mode="default"),
    Setup("compiled_autotune_amp", **_FAST, compile_mode="max-autotune-no-cudagraphs"),
    Setup("compiled_step_amp", attention="sdpa", optimizer="foreach", compile_step=True),
    Setup("fused_head_amp", **_FAST, fused_head=True),
    Setup("compiled_fused_head_amp", **_FAST, compile_mode="default", fused_head=True),
    Setup("compiled_fused_head_aten_random_amp", **_FAST, compile_mode="default", aten_random=True, fused_head=True),
    Setup("compiled_fused_head_fp32", **_FAST, amp=False, compile_mode="default", aten_random=True, fused_head=True),
    Setup("compiled_autotune_fused_head_amp", **_FAST, compile_mode="max-autotune-no-cudagraphs", aten_random=True,
          fused_head=True),
    Setup("reference_amp", reference=True),
    Setup("diagnostic_no_dropout_compiled_fused_head_amp", **_FAST, compile_mode="default", aten_random=True,
          fused_head=True, dropout=0.0),
]


# --- the reference network -----------------------------------------------------------------------


class ReferenceGPT(nn.Module):
    """The default GPT rebuilt from nn.TransformerEncoderLayer: same sizes, same parameter count."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.d_model, config.n_head, config.d_ff, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(config.context_length),
                             persistent=False)
        self.apply(GPT._init_weights)  # GPT's N(0, 0.02) init, so the tied head starts from a sane loss

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        T = idx.size(1)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        x = self.encoder(x, mask=self.causal_mask[:T, :T], is_causal=True)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


# --- one setup, ready to step --------------------------------------------------------------------


class Run:
    """A model, its optimizer and its training step, as a Setup says."""

    def __init__(self, setup: Setup, config: GPTConfig, default_threads: int, head_chunk: int):
        self.setup, self.config, self.head_chunk = setup, config, head_chunk
        self.threads = setup.threads or default_threads
        self.warmup_s = 0.0
        torch.set_num_threads(self.threads)
        torch.manual_seed(0)
        changes = {"attention": setup.attention} | ({} if setup.dropout is None else {"dropout": setup.dropout})
        model_config = GPTConfig(**(config.to_dict() | changes))
        self.model = (ReferenceGPT if setup.reference else GPT)(model_config).train()
        self.optimizer = build_optimizer(self.model, setup.optimizer)
        self.net = self.compiled(self.model.hidden if setup.fused_head else self.model)
        self.update = torch.compile(self.eager_update) if setup.compile_step else self.eager_update
        self.batches = [torch.randint(0, config.vocab_size, (2, BATCH, config.context_length)) for _ in range(4)]
        self.steps_done = 0

    def compiled(self, fn, **kwargs):
        """fn compiled as the setup says, or fn itself."""
        if not self.setup.compile_mode:
            return fn
        if self.setup.aten_random:  # options= cannot go with mode=, so spell the mode out as options
            options = torch._inductor.list_mode_options(self.setup.compile_mode) | {"fallback_random": True}
            return torch.compile(fn, options=options, **kwargs)
        return torch.compile(fn, mode=self.setup.compile_mode, **kwargs)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.setup.amp):
            if not self.setup.fused_head:
                return self.net(idx, targets)[1]
            h = self.net(idx)
            return linear_cross_entropy(h, self.model.lm_head.weight, targets, self.head_chunk)

    def eager_update(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One training step, as Trainer.train_step does it (without accumulation or clipping)."""
        loss = self.loss(idx, targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self) -> float:
        idx, targets = self.batches[self.steps_done % len(self.batches)]
        self.steps_done += 1
        with torch._dynamo.config.patch(compiled_autograd=self.setup.compile_step):
            return self.update(idx, targets).item()

    def time_steps(self, steps: int) -> float:
        """Seconds for `steps` training steps."""
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - start


def build_optimizer(model: nn.Module, kind: str) -> torch.optim.AdamW:
    """AdamW with train.py's defaults (lr 1e-4, decay 0.01 on every parameter)."""
    implementation = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **implementation)


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


def n_params(model: nn.Module) -> int:
    """Parameters, the tied embedding/head counted once."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: GPTConfig, n_params: int) -> int:
    """Training FLOPs per token (nanoGPT's estimate_mfu): 6 N + 12 L d T."""
    return 6 * n_params + 12 * config.n_layer * config.d_model * config.context_length


# --- the benchmark -------------------------------------------------------------------------------


def warm_up(setups: list[Setup], config: GPTConfig, args) -> tuple[dict[str, Run], dict[str, dict]]:
    """Build and warm up every setup (compiling happens here); failures are reported, not fatal."""
    runs, failures = {}, {}
    for setup in setups:
        start = time.perf_counter()
        try:
            run = Run(setup, config, args.threads, args.head_chunk)
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
    tokens = args.steps * BATCH * next(iter(runs.values())).config.context_length
    rates = {name: [] for name in runs}
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for round_no in range(args.rounds):
        torch.set_num_threads(args.threads)
        peaks["fp32"] = max(peaks["fp32"], matmul_gflops(torch.float32, args.matmul_size))
        peaks["bf16"] = max(peaks["bf16"], matmul_gflops(torch.bfloat16, args.matmul_size))
        for name, run in runs.items():
            rates[name].append(tokens / run.time_steps(args.steps))
        line = ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items())
        print(f"round {round_no + 1}/{args.rounds} tokens/s: {line}", file=sys.stderr, flush=True)
    return rates, peaks


def setup_entry(run: Run, rates: list[float], base_rates: list[float], peaks: dict, per_token: int) -> dict:
    """One setup's figures: median tokens/s, ratio to the baseline, MFU against its precision's peak."""
    tokens_per_s = statistics.median(rates)
    precision = "bf16" if run.setup.amp else "fp32"
    return {
        "tokens_per_s": round(tokens_per_s),
        "ratio_vs_baseline": round(statistics.median(r / b for r, b in zip(rates, base_rates)), 3),
        "mfu": round(per_token * tokens_per_s / (peaks[precision] * 1e9), 4),
        "mfu_of_peak": precision,
        "best_round_tokens_per_s": round(max(rates)),
        "step_ms": round(BATCH * run.config.context_length / tokens_per_s * 1000, 1),
        "warmup_s": round(run.warmup_s, 1),
        "n_params": n_params(run.model),
        "changes_from_baseline": run.setup.changes(),
    }


def report(runs: dict[str, Run], failures: dict, rates: dict, peaks: dict, config: GPTConfig, args) -> dict:
    per_token = flops_per_token(config, n_params(runs[BASELINE].model))
    setups = {name: setup_entry(run, rates[name], rates[BASELINE], peaks, per_token) for name, run in runs.items()}
    candidates = [name for name, run in runs.items() if run.setup.candidate]
    fastest = max(candidates, key=lambda name: setups[name]["ratio_vs_baseline"])
    best = setups[fastest]
    return {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model": {"config": config.to_dict(), "n_params": n_params(runs[BASELINE].model), "batch": BATCH,
                  "tokens_per_step": BATCH * config.context_length, "train_flops_per_token": per_token},
        "method": {"warmup_steps": args.warmup, "timed_rounds": args.rounds, "steps_per_round": args.steps,
                   "tokens_per_s": "median over the interleaved rounds",
                   "ratio_vs_baseline": "median of the per-round ratios to the baseline",
                   "mfu": "train_flops_per_token x tokens/s / matmul peak of the setup's precision",
                   "fused_head_chunk_rows": args.head_chunk},
        "baseline": f"{BASELINE}: the card's settings (manual attention, eager, bf16 autocast, AdamW foreach=False)",
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
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup (compiling happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setup per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default intra-op threads")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--head-chunk", type=int, default=256, help="rows of logits per chunk of the fused head")
    parser.add_argument("--only", default="", help="comma-separated setup names (the baseline is always run)")
    parser.add_argument("--list", action="store_true", help="list the setups and exit")
    args = parser.parse_args()
    if args.list:
        for setup in SETUPS:
            print(f"{setup.name:48} {setup.changes() or 'the card: manual attention, eager, bf16 autocast, loop AdamW'}")
        return

    torch._dynamo.config.recompile_limit = 64  # one compiled graph per setup, many from GPT.forward
    setups = pick_setups(args.only)
    config = GPTConfig()
    runs, failures = warm_up(setups, config, args)
    if BASELINE not in runs:
        raise SystemExit(f"the baseline failed: {failures[BASELINE]}")
    rates, peaks = timed_rounds(runs, args)
    print(json.dumps(report(runs, failures, rates, peaks, config, args), indent=2))


if __name__ == "__main__":
    main()
