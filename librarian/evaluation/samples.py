"""The samples artifacts: a model's outputs for fixed prompts, as Markdown.

Two stages write one: `samples` (the base model continuing params.samples.prompts) and
`chat_samples` (the chat model replying to the requests of params.chat_samples). A Layout says
how a prompt reaches the model and what the file calls its parts; the rest is shared.

Every prompt is answered with the same seed and sampling settings, each on its own: a sample does
not depend on the prompts before it, so adding a prompt leaves the others as they were. The file
names the model and tokenizer by the paths given (never absolute ones) and their SHA-256, and
carries no timestamp: identical inputs give a byte-identical file. Generation runs on the
section's `threads` torch threads (0 = auto, librarian/core/threads.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from librarian.core.config import SamplesParams
from librarian.core.errors import LibrarianError
from librarian.core.io import write_text
from librarian.core.threads import resolve_threads, using_threads
from librarian.data.tokenizer import file_sha256
from librarian.inference.generate import GenerationOptions, Generator


def display_path(path: str | Path) -> str:
    """The path as given if relative (POSIX separators), else just the file name: no machine's layout leaks in."""
    path = Path(path)
    return path.name if path.is_absolute() else path.as_posix()


def fenced(text: str) -> str:
    """A fenced code block holding `text` verbatim: the fence is longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


@dataclass(frozen=True)
class Layout:
    """What a samples file is about: how a prompt reaches the model, and the file's words for its parts."""

    section: str  # the params section, named in errors: "samples"
    title: str
    prompt: str  # what a prompt is called in the text: "prompt"
    prompt_label: str
    output_label: str
    to_model: Callable[[str], str] = str  # the text the model continues
    stop_strings: tuple[str, ...] = ()  # where an output ends besides <|endoftext|>
    tidy: Callable[[str], str] = str  # the output as shown
    notes: tuple[str, ...] = ()  # more lines for the header's list
    missing_model: str = ""  # what to do when the model file is missing, if not the loader's "train a model"


# The samples stage: the base model continues each prompt as it is.
SAMPLES = Layout("samples", "Samples", "prompt", "Prompt:", "Continuation:")


def render_samples(
    generator: Generator,
    params: SamplesParams,
    model_name: str,
    tokenizer_name: str,
    model_sha: str,
    tokenizer_sha: str,
    layout: Layout = SAMPLES,
) -> str:
    options = GenerationOptions.of(params)
    ends = " or ".join(f"`{stop}`" for stop in ("<|endoftext|>", *layout.stop_strings))
    lines = [
        f"# {layout.title}",
        "",
        f"- model: `{model_name}` (sha256 `{model_sha[:16]}`)",
        f"- tokenizer: `{tokenizer_name}` (sha256 `{tokenizer_sha[:16]}`)",
        f"- sampling: temperature {params.temperature:g}, top-k {params.top_k}, top-p {params.top_p:g}, "
        f"seed {params.seed} for every {layout.prompt}, up to {params.max_new_tokens} new tokens "
        f"(ends early at {ends})",
        *(f"- {note}" for note in layout.notes),
    ]
    for i, prompt in enumerate(params.prompts, start=1):
        output = layout.tidy(generator.complete(layout.to_model(prompt), options, layout.stop_strings))
        lines += ["", f"## Sample {i}", "", layout.prompt_label, "", fenced(prompt)]
        lines += ["", layout.output_label, "", fenced(output)]
    return "\n".join(lines) + "\n"


def write_samples(
    model_path: str | Path,
    tokenizer_path: str | Path,
    out: str | Path,
    params: SamplesParams,
    layout: Layout = SAMPLES,
) -> str:
    """Generate the samples and write them to `out` atomically; returns the Markdown."""
    if layout.missing_model and not Path(model_path).exists():
        raise LibrarianError(f"model file {model_path} not found; {layout.missing_model}")
    generator = Generator.load(model_path, tokenizer_path)
    threads = resolve_threads(params.threads, generator.model.config.d_model, f"{layout.section}.threads")
    with using_threads(threads):
        text = render_samples(
            generator,
            params,
            display_path(model_path),
            display_path(tokenizer_path),
            file_sha256(model_path),
            file_sha256(tokenizer_path),
            layout,
        )
    write_text(out, text)
    return text
