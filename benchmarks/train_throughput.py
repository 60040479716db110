"""Benchmark training throughput (tokens/s) of Librarian's default GPT on this CPU.

    . .venv/bin/activate
    python benchmarks/train_throughput.py                      # every setup, a few minutes
    python benchmarks/train_throughput.py --rounds 5 --steps 8 # steadier figures, slower
    python benchmarks/train_throughput.py --only baseline_amp,compiled_sdpa_amp

What it measures: full training steps (forward, backward, AdamW step, zero_grad) of the default
model (GPTConfig(): vocab 8000, context 128, 2 layers, 4 heads, width 128, feed-forward 256,
dropout 0.2; 1,305,600 parameters) at batch 32 x 128 tokens, on random token ids, in train mode
(dropout on) -- the way librarian/train.py does a step.

Setups (all the same model and maths, only the execution differs):
  * baseline_amp -- the card's setting and THE BASELINE of every ratio: manual attention with the
    explicit mask, eager, bf16 autocast ("mixed precision"), AdamW(foreach=False) as in train.py.
    baseline_fp32 is the same without autocast.
  * candidates: fused scaled_dot_product_attention, AdamW(fused=True), torch.compile of the
    model (mode default and max-autotune-no-cudagraphs), one thread instead of all, and a fused
    "linear + cross-entropy" head that computes the tied lm_head and the loss in row chunks, so
    the (4096 x 8000) logits never exist whole in memory.
  * reference_amp -- the same network built from torch.nn.TransformerEncoderLayer (norm_first,
    GELU, batch_first, causal mask), same embeddings, tied head and final LayerNorm, eager.

Noise: the machine is shared, so every setup is built and warmed up first (that is where
torch.compile compiles), then timed in interleaved rounds: each round runs --steps steps of
every setup in turn. A setup's tokens/s is its median over the rounds; its ratio is the median
of its per-round ratios to the baseline of the same round.

Peak: fp32 and bf16 square matmuls (--matmul-size) are timed in every round too; the best is
the achievable GFLOP/s. MFU = training FLOPs per token x tokens/s / peak (of the setup's matmul
precision), with nanoGPT's estimate: 6 N + 12 n_layer d_model context FLOPs per token, N being
every parameter, the tied embedding included (it is the lm_head's matmul).

Prints a JSON report; goals: the fastest setup >= 3.5x the baseline and >= 25,000 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    optimizer: str = "loop"  # loop: foreach=False as in train.py | foreach | fused
    compile_mode: str | None = None  # None: eager; else torch.compile's mode
    threads: int = 0  # 0: torch's default
    fused_head: bool = False  # lm_head + cross-entropy in row chunks
    reference: bool = False  # the nn.TransformerEncoderLayer network


BASELINE = "baseline_amp"
SETUPS = [
    Setup(BASELINE),
    Setup("baseline_fp32", amp=False),
    Setup("sdpa_amp", attention="sdpa"),
    Setup("fused_adamw_amp", optimizer="fused"),
    Setup("foreach_adamw_amp", optimizer="foreach"),
    Setup("sdpa_fused_adamw_fp32", attention="sdpa", amp=False, optimizer="fused"),
    Setup("one_thread_amp", threads=1),
    Setup("fused_head_amp", attention="sdpa", optimizer="fused", fused_head=True),
    Setup("fused_head_fp32", attention="sdpa", amp=False, optimizer="fused", fused_head=True),
    Setup("compiled_sdpa_amp", attention="sdpa", optimizer="fused", compile_mode="default"),
    Setup("compiled_sdpa_fp32", attention="sdpa", amp=False, optimizer="fused", compile_mode="default"),
    Setup("compiled_manual_fp32", amp=False, optimizer="fused", compile_mode="default"),
    Setup("compiled_autotune_fp32", attention="sdpa", amp=False, optimizer="fused",
          compile_mode="max-autotune-no-cudagraphs"),
    Setup("compiled_fused_head_amp", attention="sdpa", optimizer="fused", compile_mode="default", fused_head=True),
    Setup("compiled_fused_head_fp32", attention="sdpa", amp=False, optimizer="fused", compile_mode="default",
          fused_head=True),
    Setup("reference_amp", reference=True),
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        T = idx.size(1)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        x = self.encoder(x, mask=self.causal_mask[:T, :T], is_causal=True)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


# --- the fused head ------------------------------------------------------------------------------


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy(h @ weight.T, targets), with its gradients computed chunk by chunk.

    The same maths as lm_head + F.cross_entropy on fp32 logits, but only `chunk` rows of logits
    exist at a time (in cache), and the gradients are made in the forward pass, so the backward
    pass only scales them.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, compute_dtype: torch.dtype):
        n = h.size(0)
        h_c, w_c = h.to(compute_dtype), weight.to(compute_dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        loss = torch.zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = (h_c[rows] @ w_c.T).float()
            target = targets[rows]
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(probs.size(0)), target] -= 1.0
            g = probs.div_(n).to(compute_dtype)
            grad_h[rows] = g @ w_c
            grad_w += g.T @ h_c[rows]
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


class Trunk(nn.Module):
    """GPT.forward up to the final norm: the hidden states the lm_head reads."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.tok_emb(idx) + m.pos_emb(torch.arange(idx.size(1), device=idx.device))
        x = m.drop(x)
        for block in m.blocks:
            x = block(x)
        return m.ln_f(x)


# --- one setup, ready to step --------------------------------------------------------------------


class Run:
    """A model, its optimizer and its training step, as a Setup says."""

    def __init__(self, setup: Setup, config: GPTConfig, default_threads: int, head_chunk: int):
        self.setup, self.config, self.head_chunk = setup, config, head_chunk
        self.threads = setup.threads or default_threads
        torch.set_num_threads(self.threads)
        torch.manual_seed(0)
        model_config = GPTConfig(**{**config.to_dict(), "attention": setup.attention})
        self.model = ReferenceGPT(model_config) if setup.reference else GPT(model_config)
        self.model.train()
        self.optimizer = build_optimizer(self.model, setup.optimizer)
        net = Trunk(self.model) if setup.fused_head else self.model
        self.net = torch.compile(net, mode=setup.compile_mode) if setup.compile_mode else net
        self.batches = [torch.randint(0, config.vocab_size, (2, BATCH, config.context_length)) for _ in range(4)]
        self.steps_done = 0

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.setup.amp):
            if not self.setup.fused_head:
                return self.net(idx, targets)[1]
            h = self.net(idx)
        compute_dtype = torch.bfloat16 if self.setup.amp else torch.float32
        return LinearCrossEntropy.apply(h.flatten(0, 1), self.model.lm_head.weight, targets.reshape(-1),
                                        self.head_chunk, compute_dtype)

    def step(self) -> float:
        idx, targets = self.batches[self.steps_done % len(self.batches)]
        self.steps_done += 1
        loss = self.loss(idx, targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

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
        run.first_loss = loss
        print(f"[{setup.name}] warmed up in {run.warmup_s:.1f}s (loss {loss:.3f})", file=sys.stderr, flush=True)
    return runs, failures


def timed_rounds(runs: dict[str, Run], args, default_threads: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleaved rounds: every setup's tokens/s per round, and the best matmul peaks."""
    tokens = args.steps * BATCH * next(iter(runs.values())).config.context_length
    rates = {name: [] for name in runs}
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for round_no in range(args.rounds):
        torch.set_num_threads(default_threads)
        peaks["fp32"] = max(peaks["fp32"], matmul_gflops(torch.float32, args.matmul_size))
        peaks["bf16"] = max(peaks["bf16"], matmul_gflops(torch.bfloat16, args.matmul_size))
        for name, run in runs.items():
            rates[name].append(tokens / run.time_steps(args.steps))
        line = ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items())
        print(f"round {round_no + 1}/{args.rounds} tokens/s: {line}", file=sys.stderr, flush=True)
    return rates, peaks


def report(runs, failures, rates, peaks, config, args, default_threads) -> dict:
    base = rates.get(BASELINE)
    per_token = flops_per_token(config, runs[next(iter(runs))].model.n_params() if BASELINE not in runs
                                else runs[BASELINE].model.n_params())
    setups = {}
    for name, run in runs.items():
        tokens_per_s = statistics.median(rates[name])
        peak = peaks["bf16" if run.setup.amp else "fp32"]
        entry = {
            "tokens_per_s": round(tokens_per_s),
            "best_round_tokens_per_s": round(max(rates[name])),
            "ratio_vs_baseline": round(statistics.median(r / b for r, b in zip(rates[name], base)), 3) if base else None,
            "mfu": round(per_token * tokens_per_s / (peak * 1e9), 4),
            "mfu_peak": "bf16" if run.setup.amp else "fp32",
            "warmup_s": round(run.warmup_s, 1),
            "settings": {k: v for k, v in vars(run.setup).items() if k != "name"} | {"threads": run.threads},
        }
        setups[name] = entry
    candidates = {n: e for n, e in setups.items() if not runs[n].setup.reference}
    fastest = max(candidates, key=lambda n: candidates[n]["tokens_per_s"])
    best = setups[fastest]
    return {
        "torch": torch.__version__,
        "threads": default_threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model": {"config": config.to_dict(), "n_params": runs[fastest].model.n_params(),
                  "batch": BATCH, "tokens_per_step": BATCH * config.context_length,
                  "train_flops_per_token": per_token},
        "method": {"warmup_steps": args.warmup, "timed_rounds": args.rounds, "steps_per_round": args.steps,
                   "tokens_per_s": "median over rounds", "ratio": "median of per-round ratios to the baseline",
                   "head_chunk_rows": args.head_chunk},
        "baseline": f"{BASELINE} (card: manual attention, eager, bf16 autocast, AdamW foreach=False)",
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()} | {"size": args.matmul_size},
        "setups": setups,
        "failed": failures,
        "fastest": fastest,
        "goals": {
            "speedup_ge_3.5x": (best["ratio_vs_baseline"] or 0) >= GOAL_SPEEDUP,
            "tokens_per_s_ge_25000": best["tokens_per_s"] >= GOAL_TOKENS_PER_S,
            "fastest_ratio": best["ratio_vs_baseline"],
            "fastest_tokens_per_s": best["tokens_per_s"],
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup (compiling happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setup per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default intra-op threads")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--head-chunk", type=int, default=512, help="rows of logits per chunk of the fused head")
    parser.add_argument("--only", default="", help="comma-separated setup names (the baseline is always run)")
    args = parser.parse_args()

    torch._dynamo.config.recompile_limit = 64  # one compiled graph per setup, all from GPT.forward
    wanted = set(filter(None, args.only.split(","))) | {BASELINE}
    setups = [s for s in SETUPS if not args.only or s.name in wanted]
    config = GPTConfig()
    runs, failures = warm_up(setups, config, args)
    if BASELINE not in runs:
        raise SystemExit(f"the baseline failed: {failures[BASELINE]}")
    rates, peaks = timed_rounds(runs, args, args.threads)
    print(json.dumps(report(runs, failures, rates, peaks, config, args, args.threads), indent=2))


if __name__ == "__main__":
    main()
