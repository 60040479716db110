"""Benchmark generation: tokens/s with and without the KV cache, and chat's time to first token.

    python benchmarks/generate_throughput.py [--model data/model/model.safetensors --tokenizer data/tokenizer.json]

Without --model it uses the card's architecture with fresh random weights (speed does not depend
on what the weights say). Greedy decoding, no stop token, so every run makes exactly the number
of tokens asked for; cached and uncached runs alternate, best of --repeats. Past the context
length both paths slide the same window (librarian/generate.py), so the cache's advantage
shrinks at 512 new tokens: it refills once every half context instead of every step.
Goal: cached >= 3x uncached at 128 new tokens.
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

from librarian.generate import Generator, Sampling, generate_ids  # noqa: E402
from librarian.model import GPT, GPTConfig  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
CHAT_PROMPT = "User: Hi! Can you tell me a story about a brave little cat?\nAssistant:"


def tokens_per_s(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        made = sum(1 for _ in generate_ids(model, prompt, new_tokens, Sampling(temperature=0), use_cache=use_cache))
        best = min(best, time.perf_counter() - start)
    assert made == new_tokens
    return new_tokens / best


def time_to_first_token(generator: Generator, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        next(iter(generator.stream(CHAT_PROMPT, max_new_tokens=50, sampling=Sampling(0.8, 50, 0.95), seed=0,
                                   stop_strings=("User:",))))
        best = min(best, time.perf_counter() - start)
    return best


def load(args) -> Generator:
    if args.model:
        return Generator.load(args.model, args.tokenizer)
    from librarian.config import load_params
    from librarian.sources import read_shard
    from librarian.tokenizer import train_tokenizer

    stories = read_shard(ROOT / "tests" / "fixtures" / "tinystories" / "train-sample.txt.gz")
    tokenizer = train_tokenizer(stories, load_params(ROOT / "params.yaml").tokenizer)
    torch.manual_seed(0)
    return Generator(GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size())), tokenizer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = load(args)
    prompt = generator.encode(PROMPT)
    report = {"model": str(args.model or "random weights, card architecture"), "threads": torch.get_num_threads(),
              "prompt_tokens": len(prompt), "context_length": generator.model.config.context_length}
    for new_tokens in (128, 512):
        uncached = tokens_per_s(generator.model, prompt, new_tokens, use_cache=False, repeats=args.repeats)
        cached = tokens_per_s(generator.model, prompt, new_tokens, use_cache=True, repeats=args.repeats)
        report[f"new_tokens_{new_tokens}"] = {"uncached_tokens_per_s": round(uncached, 1),
                                              "cached_tokens_per_s": round(cached, 1),
                                              "speedup": round(cached / uncached, 2)}
    report["chat_time_to_first_token_ms"] = round(1000 * time_to_first_token(generator, args.repeats), 1)
    report["goal_cached_ge_3x_at_128"] = report["new_tokens_128"]["speedup"] >= 3
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
