"""Benchmark generation: tokens/s with and without the KV cache, chat's time to first token, and
decoding with one core busy.

    python benchmarks/generate_throughput.py [--model data/model/model.safetensors --tokenizer data/tokenizer.json]
    python benchmarks/generate_throughput.py --sweep-widths 128,256,384,512,768   # behind threads' auto rule

Without --model it uses the card's architecture with fresh random weights (speed does not depend
on what the weights say). Greedy decoding, no stop token, so every run makes exactly the number
of tokens asked for. Figures are medians over --repeats interleaved runs (the machine may be
shared). Past the context length both paths slide the same window (librarian/inference/generate.py), so
the cache's advantage shrinks at 512 new tokens: it refills once every half context instead of
every step.

Threads: the runs use the CLI's default, the auto rule of librarian/core/threads.py. The busy figures
rerun cached decoding of 128 tokens while a busy-loop process pinned to one core competes for
the CPU; torch's own default (one thread per core) is timed both ways too, as the baseline the
auto rule replaced. --sweep-widths times decoding on one thread and on every core for models of
the card's shape at other widths: the measurement behind threads.DECODE_ONE_THREAD_UP_TO.

Guidance (--guidance, default 2): cached decoding of 128 tokens free and with classifier-free
guidance at that scale (a second forward pass a token, over the negative prompt, with its own
cache), interleaved; the report gives both and guided/free.

Goals: cached >= 3x uncached at 128 new tokens; busy >= 0.7x idle at the default threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import at, busy_core, card_config, cpu_name, medians  # noqa: E402  (benchmarks/common.py)
from librarian.inference.generate import GenerationOptions, Generator, generate_ids  # noqa: E402
from librarian.model.gpt import GPT  # noqa: E402
from librarian.core.threads import auto_threads, available_cores, using_threads  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
CHAT_PROMPT = "User: Hi! Can you tell me a story about a brave little cat?\nAssistant:"


def tokens_per_s(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool = True, guidance: float = 1.0,
                 negative: tuple[int, ...] = ()) -> float:
    start = time.perf_counter()
    greedy = GenerationOptions(temperature=0, max_new_tokens=new_tokens, use_cache=use_cache, guidance=guidance,
                               negative=negative)
    made = sum(1 for _ in generate_ids(model, prompt, greedy))
    assert made == new_tokens
    return new_tokens / (time.perf_counter() - start)


def time_to_first_token(generator: Generator) -> float:
    start = time.perf_counter()
    options = GenerationOptions(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=50, seed=0)
    next(iter(generator.stream(CHAT_PROMPT, options, stop_strings=("User:",))))
    return time.perf_counter() - start


def load(args) -> Generator:
    if args.model:
        return Generator.load(args.model, args.tokenizer)
    from librarian.core.config import load_params
    from librarian.data.sources import read_shard
    from librarian.data.tokenizer import train_tokenizer

    stories = read_shard(ROOT / "tests" / "fixtures" / "tinystories" / "train-sample.txt.gz")
    tokenizer = train_tokenizer(stories, load_params(ROOT / "params.yaml").tokenizer)
    torch.manual_seed(0)
    return Generator(GPT(card_config(vocab_size=tokenizer.get_vocab_size())), tokenizer)


def cache_report(generator: Generator, prompt: list[int], repeats: int) -> dict:
    report = {}
    for new_tokens in (128, 512):
        rates = medians({"uncached": lambda n=new_tokens: tokens_per_s(generator.model, prompt, n, use_cache=False),
                         "cached": lambda n=new_tokens: tokens_per_s(generator.model, prompt, n)}, repeats)
        report[f"new_tokens_{new_tokens}"] = {"uncached_tokens_per_s": round(rates["uncached"], 1),
                                              "cached_tokens_per_s": round(rates["cached"], 1),
                                              "speedup": round(rates["cached"] / rates["uncached"], 2)}
    return report


def guidance_report(generator: Generator, prompt: list[int], scale: float, repeats: int) -> dict:
    """Cached decoding of 128 tokens, free and guided (the negative prompt: chat's neutral request)."""
    from librarian.data.chat_template import NEUTRAL_REQUEST, render_prompt

    negative = tuple(generator.encode(render_prompt([], NEUTRAL_REQUEST)))
    rates = medians({"free": lambda: tokens_per_s(generator.model, prompt, 128),
                     "guided": lambda: tokens_per_s(generator.model, prompt, 128, guidance=scale, negative=negative)},
                    repeats)
    return {"guidance": scale, "free_tokens_per_s": round(rates["free"], 1),
            "guided_tokens_per_s": round(rates["guided"], 1), "guided_over_free": round(rates["guided"] / rates["free"], 2)}


def busy_report(model: GPT, prompt: list[int], default_threads: int, repeats: int) -> dict:
    """Cached decoding of 128 tokens, idle then with one core busy, at the default and at torch's threads."""
    counts = {"default": default_threads, "torch_default": available_cores()}
    runs = {}
    for name, n in counts.items():
        runs[name] = lambda n=n: at(n, lambda: tokens_per_s(model, prompt, 128))
    idle_load, busy_load = {}, {}
    idle = medians(runs, repeats, idle_load)
    with busy_core() as core:
        busy = medians(runs, repeats, busy_load)
    report = {"busy_core": core, "others_cores_idle": idle_load["others_cores"],
              "others_cores_busy": busy_load["others_cores"]}
    for name, n in counts.items():
        report[f"{name}_threads"] = {"threads": n, "idle_tokens_per_s": round(idle[name], 1),
                                     "busy_tokens_per_s": round(busy[name], 1),
                                     "busy_over_idle": round(busy[name] / idle[name], 2)}
    return report


def sweep_widths(widths: list[int], vocab_size: int, prompt: list[int], repeats: int) -> list[dict]:
    """Decoding tokens/s on one thread and on every core, idle, for the card's shape at other widths."""
    rows, cores = [], available_cores()
    for width in widths:
        torch.manual_seed(0)
        model = GPT(card_config(vocab_size=vocab_size, d_model=width, d_ff=2 * width, n_head=max(4, width // 64))).eval()
        load = {}
        runs = {n: lambda n=n, model=model: at(n, lambda: tokens_per_s(model, prompt, 128)) for n in (1, cores)}
        rates = medians(runs, repeats, load)
        rows.append({"d_model": width, "n_params": model.n_params(), "one_thread_tokens_per_s": round(rates[1], 1),
                     f"{cores}_threads_tokens_per_s": round(rates[cores], 1),
                     f"{cores}_threads_over_one": round(rates[cores] / rates[1], 2),
                     "auto_threads": auto_threads(width),
                     **load})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-widths", help="comma-separated d_model values: time 1 thread against every core")
    parser.add_argument("--guidance", type=float, default=2.0, help="the guided run's scale (default 2)")
    parser.add_argument("--only-guidance", action="store_true", help="time free against guided decoding only")
    args = parser.parse_args()
    generator = load(args)
    prompt = generator.encode(PROMPT)
    default_threads = auto_threads(generator.model.config.d_model)
    report = {"cpu": cpu_name(), "cores": available_cores(),
              "model": str(args.model or "random weights, card architecture"), "default_threads": default_threads,
              "prompt_tokens": len(prompt), "context_length": generator.model.config.context_length,
              "repeats": args.repeats}
    if args.sweep_widths:
        widths = [int(w) for w in args.sweep_widths.split(",")]
        report["sweep"] = sweep_widths(widths, generator.model.config.vocab_size, prompt, args.repeats)
        print(json.dumps(report, indent=2))
        return
    with using_threads(default_threads):
        report["guided_decoding_128"] = guidance_report(generator, prompt, args.guidance, args.repeats)
        if args.only_guidance:
            print(json.dumps(report, indent=2))
            return
        report.update(cache_report(generator, prompt, args.repeats))
        ttft = medians({"ttft": lambda: time_to_first_token(generator)}, args.repeats)["ttft"]
        report["chat_time_to_first_token_ms"] = round(1000 * ttft, 1)
    report["one_core_busy"] = busy_report(generator.model, prompt, default_threads, args.repeats)
    report["goal_cached_ge_3x_at_128"] = report["new_tokens_128"]["speedup"] >= 3
    report["goal_busy_ge_0.7x_idle"] = report["one_core_busy"]["default_threads"]["busy_over_idle"] >= 0.7
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
