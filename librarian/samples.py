"""The samples artifact: the trained model's continuations of fixed prompts, as Markdown.

Every prompt is continued with the same seed and sampling settings (params.samples), each on its
own: a sample does not depend on the prompts before it, so adding a prompt leaves the others as
they were. The file names the model and tokenizer by the paths given (never absolute ones) and
their SHA-256, and carries no timestamp: identical inputs give a byte-identical file. Generation
runs on samples.threads torch threads (0 = auto, librarian/threads.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from librarian.config import SamplesParams
from librarian.generate import GenerationOptions, Generator
from librarian.io import write_text
from librarian.threads import resolve_threads, using_threads
from librarian.tokenizer import file_sha256


def display_path(path: str | Path) -> str:
    """The path as given if relative (POSIX separators), else just the file name: no machine's layout leaks in."""
    path = Path(path)
    return path.name if path.is_absolute() else path.as_posix()


def fenced(text: str) -> str:
    """A fenced code block holding `text` verbatim: the fence is longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_samples(
    generator: Generator,
    params: SamplesParams,
    model_name: str,
    tokenizer_name: str,
    model_sha: str,
    tokenizer_sha: str,
) -> str:
    options = GenerationOptions(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                max_new_tokens=params.max_new_tokens, seed=params.seed)
    lines = [
        "# Samples",
        "",
        f"- model: `{model_name}` (sha256 `{model_sha[:16]}`)",
        f"- tokenizer: `{tokenizer_name}` (sha256 `{tokenizer_sha[:16]}`)",
        f"- sampling: temperature {params.temperature:g}, top-k {params.top_k}, top-p {params.top_p:g}, "
        f"seed {params.seed} for every prompt, up to {params.max_new_tokens} new tokens "
        "(ends early at `<|endoftext|>`)",
    ]
    for i, prompt in enumerate(params.prompts, start=1):
        continuation = generator.complete(prompt, options)
        lines += ["", f"## Sample {i}", "", "Prompt:", "", fenced(prompt)]
        lines += ["", "Continuation:", "", fenced(continuation)]
    return "\n".join(lines) + "\n"


def write_samples(model_path: str | Path, tokenizer_path: str | Path, out: str | Path, params: SamplesParams) -> str:
    """Generate the samples and write them to `out` atomically; returns the Markdown."""
    generator = Generator.load(model_path, tokenizer_path)
    with using_threads(resolve_threads(params.threads, generator.model.config.d_model, "samples.threads")):
        text = render_samples(
            generator,
            params,
            display_path(model_path),
            display_path(tokenizer_path),
            file_sha256(model_path),
            file_sha256(tokenizer_path),
        )
    write_text(out, text)
    return text
