"""Classifier-free guidance against free sampling: the chat metrics of one model at each guidance scale.

    python benchmarks/guidance_sweep.py --model data/chat_model/model.safetensors --scales 1,1.5,2,3,4

For each scale, the fine-tuned model answers the first --requests words and character requests of
the chat test split (data/chat/test.parquet) and the same rows phrased by held-out templates
(test_unseen.parquet), exactly as the evaluate_chat stage samples them (evaluate_chat's params:
temperature, top-k, top-p, max_new_tokens, seed; the same rows, the same seeds at every scale; scale
1 is free sampling). It prints one row per scale: words_recall, words_all, character_recall, their
_unseen forms, reply_fluency (the replies' perplexity under the model, unguided, given the plain
request) and repetition (repeated word 3-grams), and the seconds the replies took; a JSON report
goes to --out. The stage reports one scale (evaluate_chat.guidance); this script chooses it. With
--best-of 4, a row "1, best of 4" more: four free replies a request (seeds: the request's + 0..3),
the one the request explains best kept (librarian/inference/rerank.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from librarian.core.config import load_params
from librarian.core.io import write_json
from librarian.core.threads import resolve_threads
from librarian.evaluation.evaluate_chat import (
    Asked,
    answer_groups,
    character_scores,
    read_test_requests,
    read_unseen_requests,
    text_scores,
    unseen,
    words_scores,
)
from librarian.inference.generate import GenerationOptions, Generator

COLUMNS = ("words_recall", "words_all", "character_recall", "words_recall_unseen", "words_all_unseen",
           "character_recall_unseen", "reply_fluency", "repetition", "seconds")


def scores_at(generator: Generator, options: GenerationOptions, asked: Asked, threads: int, best_of: int = 1) -> dict:
    started = time.perf_counter()
    words, character, words_unseen, character_unseen = answer_groups(
        generator, options, [asked.words, asked.character, asked.words_unseen, asked.character_unseen], threads,
        row_name(options.guidance, best_of), best_of)
    return {**words_scores(asked.words, words), **character_scores(asked.character, character),
            **unseen(words_scores(asked.words_unseen, words_unseen)),
            **unseen(character_scores(asked.character_unseen, character_unseen)),
            **text_scores(generator, words + character), "seconds": round(time.perf_counter() - started, 1)}


def row_name(scale: float, best_of: int) -> str:
    return f"{scale:g}" if best_of == 1 else f"{scale:g}, best of {best_of}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("data/chat_model/model.safetensors"))
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer.json"))
    parser.add_argument("--chat", type=Path, default=Path("data/chat"), help="the chat_data stage's folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--scales", default="1,1.5,2,3,4", help="comma-separated guidance scales (1 = free)")
    parser.add_argument("--best-of", default="", help="comma-separated n: a row for each, free sampling (scale 1) "
                        "best of n by the request's likelihood ratio (librarian/inference/rerank.py)")
    parser.add_argument("--requests", type=int, default=0, help="requests of each kind (default: evaluate_chat.requests)")
    parser.add_argument("--out", type=Path, default=Path("guidance_sweep.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    settings = params.evaluate_chat
    generator = Generator.load(args.model, args.tokenizer)
    table = read_test_requests(args.chat)
    asked = Asked.select(table, read_unseen_requests(args.chat, table), args.requests or settings.requests)
    threads = resolve_threads(settings.threads, generator.model.config.d_model, "evaluate_chat.threads", batched=True)
    options = GenerationOptions.of(settings)
    rows = {}
    print("| guidance | " + " | ".join(COLUMNS) + " |", flush=True)
    print("|---" * (len(COLUMNS) + 1) + "|", flush=True)
    runs = [(float(s), 1) for s in args.scales.split(",") if s] + [(1.0, int(n)) for n in args.best_of.split(",") if n]
    for scale, best_of in runs:
        name = row_name(scale, best_of)
        rows[name] = scores_at(generator, replace(options, guidance=scale), asked, threads, best_of)
        print(f"| {name} | " + " | ".join(f"{rows[name][c]:g}" for c in COLUMNS) + " |", flush=True)
    write_json(args.out, {"model": str(args.model), "requests": len(asked.words), "sampling": settings.model_dump(),
                          "command": " ".join(sys.argv), "scales": rows})


if __name__ == "__main__":
    main()
