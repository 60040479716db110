"""The shell commands of the docs (```bash blocks of README.md and docs/), collected for the tests that check
them: tests/pipeline/test_doc_commands.py (what cannot run here) and tests/cli/test_demo.py (the `librarian`
commands, run on the demo's result, so that the demo runs once in the suite).
"""

import re
import shlex

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A fenced bash block, indented (inside a list item) or not.
FENCE = re.compile(r"^([ \t]*)```bash\n(.*?)^\1```", re.M | re.S)

SKIPPED = {"python3 -m venv .venv", ". .venv/bin/activate", "pip install -q -e .", "pip install -q -e '.[test]'",
           "pip install -e '.[serve]'"}
PARSE_ONLY = {
    "librarian serve": "a server: it runs until stopped (tests/inference/test_serve.py runs it)",
    "librarian serve --port 8080 --model data/model/model.safetensors": "a server: it runs until stopped",
    "librarian plots HEAD lr-high": "needs the lr-high experiment of the docs' example, which trains on the hub's data",
}
# Commands the docs give that this module does not run, by program, and why (see the module's docstring).
NOT_RUN = {"dvc": "the hub, the full data, a remote or an hour; -S keys checked",
           "git": "a clone and a remote", "cd": "part of a clone", "curl": "a running server",
           "export": "sets a variable (serve's key) for the commands after it",
           "pytest": "the suite itself (.ci/run runs the README's command)",
           "python": "benchmarks: minutes to hours; the scripts must exist",
           "torchrun": "distributed training; the module must exist"}
CHAT_INPUT = "Tell me a story about a dog.\n/quit\n"


def commands() -> list[str]:
    """Every command of every bash block, in the docs' order: `a && b` gives two, a comment none."""
    found = []
    for path in DOCS:
        for match in FENCE.finditer(path.read_text(encoding="utf-8")):
            for line in re.sub(r"\\\n", " ", match.group(2)).splitlines():
                words = shlex.split(line, comments=True)
                segments = [[]]
                for word in words:
                    segments.append([]) if word == "&&" else segments[-1].append(word)
                found += [shlex.join(s) for s in segments if s]
    return found


def unique(items):
    return list(dict.fromkeys(items))


LIBRARIAN_COMMANDS = unique(c for c in commands() if c.startswith("librarian "))
RUN = [c for c in LIBRARIAN_COMMANDS if c not in PARSE_ONLY and c != "librarian demo"]
