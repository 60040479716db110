"""`librarian demo`: the whole pipeline in one to two minutes, offline, then the models at work.

The demo runs the real pipeline (`dvc exp run`, every stage) on the real TinyStories stories
shipped in tests/fixtures/, with the small, fast settings of demo.yaml. Nothing is downloaded, so
a newcomer without the Hugging Face hub sees everything work. It runs as a DVC experiment named
`demo` in the workspace: its results land in data/ and metrics/, where `librarian generate` and
`librarian chat` find them, and `dvc exp show` lists it beside the user's own runs.

The overrides live in one file, demo.yaml, in params.yaml's layout; every key must be a key of
params.yaml, so the demo cannot drift from the params schema unnoticed.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import yaml

from librarian.cli.dvc_cli import dotted, dvc_command
from librarian.core.config import parse_params, read_yaml
from librarian.core.errors import LibrarianError

DEMO_PARAMS = Path("demo.yaml")
EXPERIMENT = "demo"
PROMPT = "Once upon a time"
CHAT_MESSAGE = "Tell me a story about a cat."


def overrides(demo: dict) -> list[str]:
    """demo.yaml's nested keys as `dvc exp run -S key=value` arguments, in file order."""
    # JSON is YAML: -S parses it back to the same value, strings and lists included.
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
            for key, value in dotted(demo).items()]


def merged(base: dict, demo: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in demo.items():
        if key not in out:
            raise LibrarianError(f"{DEMO_PARAMS}: {key} is not a key of params.yaml; fix or remove it")
        out[key] = merged(out[key], value) if isinstance(value, dict) else value
    return out


def load_demo(root: Path) -> list[str]:
    """The -S overrides of demo.yaml, checked against params.yaml's schema before anything runs."""
    for name in ("dvc.yaml", "params.yaml", DEMO_PARAMS.name):
        if not (root / name).is_file():
            raise LibrarianError(f"no {name} in {root}: run `librarian demo` from the Librarian project folder "
                                 "(the one with dvc.yaml and demo.yaml)")
    demo = read_yaml((root / DEMO_PARAMS).read_text(encoding="utf-8")) or {}
    base = read_yaml((root / "params.yaml").read_text(encoding="utf-8"))
    parse_params(merged(base, demo), source=f"params.yaml with {DEMO_PARAMS}")
    return overrides(demo)


def run_pipeline(root: Path, settings: list[str]) -> None:
    """`dvc exp run -n demo -S ...` in the workspace, its output passed through as it comes."""
    cmd = dvc_command("exp", "run", "-n", EXPERIMENT, "--force")
    for setting in settings:
        cmd += ["-S", setting]
    print(f"demo: dvc exp run -n {EXPERIMENT} with the {len(settings)} settings of {DEMO_PARAMS}", flush=True)
    # Same process group: a Ctrl-C or a terminal's hang-up reaches DVC too, and we wait for it.
    if subprocess.run(cmd, cwd=root).returncode != 0:
        raise LibrarianError("the demo pipeline failed (its error is above); fix it and rerun `librarian demo`")


def show_model(root: Path) -> None:
    """A continuation from the base model and a reply from the chat model: what `generate --model
    data/model/model.safetensors` and `chat` print."""
    from librarian.inference.chat import ChatSession
    from librarian.inference.generate import GenerationOptions, Generator

    tokenizer = root / "data/tokenizer.json"
    base = Generator.load(root / "data/model/model.safetensors", tokenizer)
    chat_model = Generator.load(root / "data/chat_model/model.safetensors", tokenizer)
    options = GenerationOptions(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=60, seed=1)
    story = base.complete(PROMPT, options)
    reply = "".join(ChatSession(chat_model, options).reply(CHAT_MESSAGE)).strip()
    print(f"\ngenerate> {PROMPT}{story}\n\nchat> User: {CHAT_MESSAGE}\n      Assistant: {reply}\n")
    print("The demo model trained for seconds on 370 stories: expect words, not yet stories. Next:\n"
          f'  librarian generate --prompt "{PROMPT}"\n'
          "  librarian chat\n"
          "  dvc exp show                   # the demo beside your own runs\n"
          "  git checkout params.yaml       # back to the committed params, then `dvc repro` for a real run")


def run_demo(root: Path) -> None:
    settings = load_demo(root)
    run_pipeline(root, settings)
    show_model(root)
