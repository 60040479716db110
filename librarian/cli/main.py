"""The `librarian` command: continue a prompt, chat, or export a trained model.

    librarian generate --prompt "Once upon a time" [--temperature 0.8 --top-k 50 --top-p 0.95 ...]
    librarian chat [--temperature ...]
    librarian export --format hf OUT [--force]
    librarian serve [--host 127.0.0.1 --port 8000 --allow-host NAME --allow-origin URL]  (key: $LIBRARIAN_API_KEY)
    librarian compare [--metrics metrics/metrics.json] [--reference results/reference.json]
    librarian runs [--all-commits]
    librarian plots [REV ...] [--out dvc_plots/offline]

The model and tokenizer default to the pipeline's outputs, so these run from the project root after
`dvc repro`: the chat fine-tuned model (data/chat_model/model.safetensors) once the finetune stage
has made it, else the base model (data/model/model.safetensors), and data/tokenizer.json. generate,
chat and export say which model they use. A problem the user can
fix is reported as one `error: ...` line on stderr with exit code 1 (2 for a malformed command
line); LIBRARIAN_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from librarian.core.errors import LibrarianError
from librarian.core.stage import run_stage

BASE_MODEL = Path("data/model/model.safetensors")  # the train stage's output
CHAT_MODEL = Path("data/chat_model/model.safetensors")  # the finetune stage's output
MODEL_RULE = f"{CHAT_MODEL} if it exists, else {BASE_MODEL}"
DEFAULT_TOKENIZER = Path("data/tokenizer.json")
# librarian chat's guidance scale (issue 34's rule: the scale that raises words recall most while reply
# fluency stays within +20 % of free sampling and repetition within +5 points). Measured on the chat recipe at
# 3 M tokens + 100 SFT steps, 60 requests: words recall 0.311 -> 0.422, character recall 0.433 -> 0.783, fluency
# +19.6 %, repetition +0.4 points (docs/LOG.md, 2026-12-08). generate and serve stay free by default.
CHAT_GUIDANCE = 3.0
PROJECT_MARKERS = (Path("dvc.yaml"), Path("params.yaml"))  # what makes a folder the project folder


class Parser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported in one line like every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_command(commands, name: str, run, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose arguments `run(args)` receives."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> Parser:
    parser = Parser(prog="librarian", description="Use a trained Librarian model: generate text, chat, export.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_chat, _add_export, _add_serve, _add_compare, _add_runs, _add_plots, _add_demo):
        add(commands)
    return parser


def _add_generate(commands) -> None:
    generate = add_command(commands, "generate", run_generate,
                           help="continue a prompt, streaming the text as it comes",
                           description="Print the prompt, then the model's continuation as it is generated. "
                                       f"The model is {MODEL_RULE} (--model chooses); a line on stderr "
                                       "says which.")
    generate.add_argument("--prompt", required=True, help='the text to continue, e.g. "Once upon a time"')
    add_model_options(generate)
    add_sampling_options(generate)
    generate.add_argument("--num-samples", type=int, default=1,
                          help="continuations to print, each from seed + i when --seed is given (default: 1)")
    generate.add_argument("--negative-prompt", default=None,
                          help="with --guidance: the text guidance leans away from (default: none, the prompt's "
                               "last token alone)")


def _add_chat(commands) -> None:
    chat = add_command(commands, "chat", run_chat,
                       help="talk with the model in the User:/Assistant: format",
                       description="An interactive chat; type /help inside it for the commands. "
                                   "Ctrl-C stops a reply or clears the line, Ctrl-D or /quit leaves. "
                                   f"The model is {MODEL_RULE} (--model chooses); the first line says which.")
    add_model_options(chat)
    add_sampling_options(chat, guidance=CHAT_GUIDANCE)
    chat.add_argument("--negative-prompt", default=None,
                      help="with --guidance: the request that takes the place of yours in guidance's negative "
                           'prompt, the same conversation otherwise (default: "Tell me a story.")')
    chat.add_argument("--best-of", type=int, default=1, metavar="N",
                      help="sample N replies and show the one the request explains best (the log-likelihood "
                           "ratio against the negative prompt), whole once all N are in (default: 1, off)")


def _add_export(commands) -> None:
    export = add_command(commands, "export", run_export,
                         help="write the model as a Hugging Face transformers folder",
                         description="Export a model and its tokenizer for AutoModelForCausalLM.from_pretrained: "
                                     f"{MODEL_RULE}, or the one --model names.")
    export.add_argument("out", type=Path, metavar="OUT",
                        help="the folder to write: a new or empty one, or an earlier export with --force")
    export.add_argument("--format", choices=("hf",), default="hf", help="hf: a GPT-2 transformers folder (default)")
    export.add_argument("--force", action="store_true",
                        help="replace an earlier Librarian export at OUT (never a folder holding anything else)")
    add_model_options(export)


def _add_serve(commands) -> None:
    serve = add_command(commands, "serve", run_serve,
                        help="an OpenAI-compatible HTTP API and a chat page in the browser",
                        description="Serve the model over HTTP: /v1/chat/completions, /v1/completions and /v1/models "
                                    "as OpenAI's API has them, /health, and a chat page at /. Concurrent requests "
                                    f"share each decoding step. The model is {MODEL_RULE} (--model chooses); the "
                                    "first line says which. Install with pip install -e '.[serve]'.")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 is every "
                            "network interface: anyone who can reach the machine can use the model)")
    serve.add_argument("--port", type=int, default=8000, help="the port (default: 8000; 0 = any free port)")
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on /v1 (default: $LIBRARIAN_API_KEY, else none); "
                            "prefer the variable: a key on the command line shows in `ps` to every user")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="accept requests whose Host header is NAME too (repeatable; * for any): a name this "
                            "machine is reached by; IP addresses and localhost always pass")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                       help="let the web page at URL (an origin, like http://localhost:3000; repeatable; * for any) "
                            "use the API; pages of other origins than the server's own are refused")
    serve.add_argument("--model-name", default=None,
                       help="the model's id in the API (default: librarian-chat or librarian-base, by the model)")
    _add_serve_limits(serve)


def _add_serve_limits(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--slots", type=int, default=64, help="sequences decoded together at most (default: 64)")
    serve.add_argument("--max-tokens-limit", type=int, default=1024,
                       help="the most tokens a request may ask for (default: 1024)")
    serve.add_argument("--max-request-bytes", type=int, default=262_144,
                       help="the largest request body read (default: 262144)")
    serve.add_argument("--threads", type=int, default=0,
                       help="torch CPU threads; 0 = auto: the fastest for the model's size (default: 0)")


def _add_compare(commands) -> None:
    compare = add_command(commands, "compare", run_compare,
                          help="compare a run's test metrics with the published reference runs",
                          description="Print your metrics/metrics.json beside results/reference.json.")
    compare.add_argument("--metrics", type=Path, default=Path("metrics/metrics.json"),
                         help="the evaluate stage's output (default: metrics/metrics.json)")
    compare.add_argument("--reference", type=Path, default=Path("results/reference.json"),
                         help="the reference runs (default: results/reference.json)")


def _add_runs(commands) -> None:
    runs = add_command(commands, "runs", run_runs,
                       help="the experiments side by side: test metrics, then the params that differ",
                       description="A compact `dvc exp show`: each experiment's test loss, perplexity, "
                                   "top-k accuracy and bits/byte, and only the params that differ between them.")
    runs.add_argument("-A", "--all-commits", action="store_true", help="every commit's experiments, not only HEAD's")


def _add_plots(commands) -> None:
    plots = add_command(commands, "plots", run_plots,
                        help="draw the training curves offline: PNG files and one HTML page",
                        description="Render the plots of `dvc plots show` (or `dvc plots diff REV...`) "
                                    "without a network: a PNG per plot and an index.html with Vega inlined.")
    plots.add_argument("revisions", nargs="*", metavar="REV",
                       help="commits or experiments to draw side by side (default: the workspace)")
    plots.add_argument("--out", type=Path, default=Path("dvc_plots/offline"),
                       help="the folder to write (default: dvc_plots/offline; replaced whole on a rerun)")


def _add_demo(commands) -> None:
    add_command(commands, "demo", run_demo,
                help="run the whole pipeline offline in about a minute, then generate and chat",
                description="Train a small model on the stories shipped in tests/fixtures/ "
                            "(`dvc exp run -n demo` with the settings of demo.yaml), then show it "
                            "generating and chatting. Needs no network.")


def run_demo(args: argparse.Namespace) -> None:
    from librarian.cli.demo import run_demo

    run_demo(Path.cwd())


def run_runs(args: argparse.Namespace) -> None:
    from librarian.cli.runs import runs

    print(runs(args.all_commits))


def run_plots(args: argparse.Namespace) -> None:
    from librarian.cli.plots import render

    index, *images = render(args.revisions, args.out)
    print(f"plots: {len(images)} PNG files and {index} (opens offline)")


def run_compare(args: argparse.Namespace) -> None:
    from librarian.cli.results import compare

    print(compare(args.metrics, args.reference))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    # None: default_model() decides when the command runs, from the files there are then.
    parser.add_argument("--model", type=Path, default=None, help=f"model file (default: {MODEL_RULE})")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help=f"tokenizer file (default: {DEFAULT_TOKENIZER})")


def add_sampling_options(parser: argparse.ArgumentParser, guidance: float = 1.0) -> None:
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off (default: 50)")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = off (default: 0.95)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    parser.add_argument("--seed", type=int, default=None, help="make the sampling repeatable (default: random)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole window each step (slower)")
    parser.add_argument("--guidance", type=float, default=guidance,
                        help=f"classifier-free guidance scale, 0 < G <= 20, 1 = off (default: {guidance:g}); above 1 "
                             "the text follows the prompt more closely, at two forward passes a token")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; 0 = auto: the fastest for the model's size (default: 0)")


def default_model() -> Path:
    """The chat fine-tuned model once the finetune stage has made it, else the base model."""
    return CHAT_MODEL if CHAT_MODEL.exists() else BASE_MODEL


def describe_model(model: Path) -> str:
    """Which model a command uses, and how to choose the other one: the line it starts with."""
    if model == CHAT_MODEL:
        return f"model: {model} (chat fine-tuned; --model {BASE_MODEL} for the base model)"
    if model == BASE_MODEL:
        hint = "" if CHAT_MODEL.exists() else f"; `dvc repro finetune` makes the chat model, {CHAT_MODEL}"
        return f"model: {model} (base model{hint})"
    return f"model: {model} (given by --model)"


def options_from(args: argparse.Namespace):
    """The validated GenerationOptions of the command line (LibrarianError on a bad value)."""
    from librarian.inference.generate import GenerationOptions

    return GenerationOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             max_new_tokens=args.max_new_tokens, seed=args.seed, use_cache=not args.no_cache,
                             guidance=args.guidance)


def use_threads(args: argparse.Namespace, generator) -> None:
    """Decode on --threads torch threads, or the auto choice for this model (librarian/core/threads.py)."""
    import torch

    from librarian.core.threads import resolve_threads

    torch.set_num_threads(resolve_threads(args.threads, generator.model.config.d_model, "--threads"))


def utf8_argument(value: str, flag: str) -> str:
    """A command-line text as given, refused if it is not UTF-8 (Python keeps such bytes as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(value[exc.start]) - 0xDC00 if 0xDC80 <= ord(value[exc.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"character U+{ord(value[exc.start]):04X}"
        raise LibrarianError(f"{flag} is not valid UTF-8 text ({what} at position {exc.start}); "
                             "pass UTF-8 text (set your terminal or script to UTF-8)") from None
    return value


def run_generate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from librarian.inference.chat import strip_controls
    from librarian.inference.generate import Generator, nth_seed

    require_open("stdout", "generate prints its text there: leave stdout open, or send it to a file (> story.txt)")
    options = options_from(args)
    if args.num_samples < 1:
        raise LibrarianError(f"--num-samples must be >= 1, got {args.num_samples}")
    prompt = strip_controls(utf8_argument(args.prompt, "--prompt"))
    if not prompt.strip():
        raise LibrarianError('the prompt is empty; give some text to continue, e.g. --prompt "Once upon a time"')
    generator = Generator.load(args.model, args.tokenizer)
    use_threads(args, generator)
    if args.negative_prompt is not None:
        negative = strip_controls(utf8_argument(args.negative_prompt, "--negative-prompt"))
        options = replace(options, negative=tuple(generator.encode(negative)))
    # On stderr: stdout carries only the text, so `librarian generate ... > story.txt` stays clean.
    print(describe_model(args.model), file=sys.stderr, flush=True)
    tokens, context = len(generator.encode(prompt)), generator.model.config.context_length
    if tokens > context:
        print(f"note: the prompt is {tokens} tokens, more than the model's context of {context}: "
              f"the model sees only its last {context} (all of it is printed)", file=sys.stderr, flush=True)
    out = sys.stdout
    for i in range(args.num_samples):
        if i:
            out.write(f"\n--- sample {i + 1} ---\n")
        out.write(prompt)
        out.flush()
        for piece in generator.stream(prompt, replace(options, seed=nth_seed(options.seed, i))):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()


def run_chat(args: argparse.Namespace) -> None:
    from librarian.inference import chat
    from librarian.inference.generate import Generator

    require_open("stdin", "chat reads your messages from it: run it in a terminal, or pipe them in (< messages.txt)")
    require_open("stdout", "chat prints its replies there: run it in a terminal, or send them to a file (> chat.txt)")
    options = options_from(args)
    chat.check_best_of(args.best_of)
    generator = Generator.load(args.model, args.tokenizer)
    use_threads(args, generator)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    input_fn = input
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    else:
        def input_fn(prompt: str) -> str:  # piped input is not echoed: echo it, so the transcript reads right
            line = input(prompt)
            print(line, flush=True)
            return line

    print(describe_model(args.model), flush=True)  # the line before the banner
    neutral = chat.NEUTRAL_REQUEST if args.negative_prompt is None else \
        chat.one_line(utf8_argument(args.negative_prompt, "--negative-prompt"))
    chat.run_chat(generator, options, input_fn=input_fn, output=sys.stdout, neutral_request=neutral,
                  best_of=args.best_of)


def run_serve(args: argparse.Namespace) -> None:
    import signal

    from librarian.core import process
    from librarian.inference.generate import Generator

    for name in ("slots", "max_tokens_limit", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise LibrarianError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise LibrarianError(f"--port must be between 0 and 65535, got {args.port}")
    check_access_flags(args)
    args.api_key = api_key(args.api_key)
    try:  # from here on, a stop is the server's, even while it loads
        try:
            from librarian.inference import server
        except ImportError as exc:
            raise LibrarianError(f"serve needs the serve extra ({exc.name} is missing); "
                                 "pip install -e '.[serve]'") from None
        serve(args, server, Generator.load(args.model, args.tokenizer))
    except KeyboardInterrupt:
        process.say("error: interrupted; the server stopped, and the replies in flight were ended")
        sys.exit(process.exit_code(signal.SIGINT))
    except process.Terminated:
        process.say("error: terminated (SIGTERM); the server stopped, and the replies in flight were ended")
        sys.exit(process.exit_code(signal.SIGTERM))


def api_key(given: str | None) -> str | None:
    """The key from --api-key, with a warning, else from $LIBRARIAN_API_KEY; refused when empty."""
    from librarian.core import process

    source = "--api-key" if given is not None else "LIBRARIAN_API_KEY"
    key = given if given is not None else os.environ.get("LIBRARIAN_API_KEY")
    if key is not None and not key.strip():
        raise LibrarianError(f"{source} is empty; give a key, or leave it out for no key")
    if given is not None:  # every user of the machine can read a process's arguments; nobody else its environment
        process.say("warning: --api-key shows the key to every user of this machine (ps); "
                    "set LIBRARIAN_API_KEY instead")
    return key


def check_access_flags(args: argparse.Namespace) -> None:
    from librarian.inference.guard import check_host_flag, check_origin_flag

    try:
        args.allow_host = [check_host_flag(name) for name in args.allow_host]
        args.allow_origin = [check_origin_flag(origin) for origin in args.allow_origin]
    except ValueError as exc:
        raise LibrarianError(str(exc)) from None


def serve(args: argparse.Namespace, server, generator) -> None:
    use_threads(args, generator)
    name = args.model_name or {CHAT_MODEL: "librarian-chat", BASE_MODEL: "librarian-base"}.get(
        args.model, args.model.stem)
    settings = server.ServeSettings(model_id=name, max_tokens_limit=args.max_tokens_limit,
                                    max_request_bytes=args.max_request_bytes, api_key=args.api_key,
                                    allow_hosts=tuple(args.allow_host), allow_origins=tuple(args.allow_origin))
    print(describe_model(args.model), flush=True)
    server.serve(generator, settings, args.host, args.port, args.slots)


def run_export(args: argparse.Namespace) -> None:
    from librarian.inference.export import export_hf

    out = export_hf(args.model, args.tokenizer, args.out, force=args.force)
    print(describe_model(args.model))
    print(f"export: {args.format} model written to {out}")


def check_project(args: argparse.Namespace) -> None:
    """The default model and tokenizer are relative to the project folder: from elsewhere, say where to run.

    Explicit --model/--tokenizer paths work from anywhere. Inside the project, when neither default
    exists, nothing has run yet: say how to make them; one missing default is reported by its loader.
    """
    defaults = (("model", (CHAT_MODEL, BASE_MODEL)), ("tokenizer", (DEFAULT_TOKENIZER,)))
    missing = [name for name, paths in defaults
               if getattr(args, name, None) in paths and not getattr(args, name).exists()]
    here = Path.cwd()
    options = " and ".join(f"--{name}" for name in missing)
    if missing and not any((here / marker).is_file() for marker in PROJECT_MARKERS):
        above = next((folder for folder in here.parents if (folder / "dvc.yaml").is_file()), None)
        project = f"the project folder ({above})" if above else "the project folder, the one with dvc.yaml,"
        raise LibrarianError(f"no Librarian project here ({here}: no dvc.yaml or params.yaml); "
                             f"run from {project} or pass {options}")
    if len(missing) == len(defaults):
        # Nothing has run yet: the missing tokenizer is only the first of the missing files.
        raise LibrarianError(f"no trained model here yet (no {BASE_MODEL}, no {DEFAULT_TOKENIZER}); run `librarian demo` "
                             f"(a tiny model in about two minutes, offline) or `dvc repro`, or pass {options}")


def check_given_tokenizer(args: argparse.Namespace) -> None:
    """A --tokenizer the user gave is checked first, so that its errors say to fix the path, not to rerun DVC."""
    if getattr(args, "tokenizer", DEFAULT_TOKENIZER) != DEFAULT_TOKENIZER:
        from librarian.data.tokenizer import GIVEN_FIX, load_tokenizer

        load_tokenizer(args.tokenizer, fix=GIVEN_FIX)


def require_open(stream: str, why: str) -> None:
    """`<&-` or `>&-` closes a standard stream, and Python then sets sys.stdin/sys.stdout to None."""
    if getattr(sys, stream) is None:
        raise LibrarianError(f"{stream} is closed; {why}")


def _main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if "model" in args and args.model is None:
        args.model = default_model()
    try:
        check_project(args)
        check_given_tokenizer(args)
        args.run(args)
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`librarian generate ... | head`): stop quietly, and keep Python's
        # final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


# run_stage turns a LibrarianError into `error: <message>` on stderr and exit code 1.
main = run_stage(_main)


if __name__ == "__main__":
    main()
