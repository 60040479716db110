"""The published reference runs (results/reference.json) and how a run compares with them.

    librarian compare                      # metrics/metrics.json against every reference run
    librarian compare --metrics other.json --reference results/reference.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from librarian.errors import LibrarianError

DEFAULT_REFERENCE = Path("results/reference.json")
DEFAULT_METRICS = Path("metrics/metrics.json")
# The held-out metrics every run reports, in the order of the README's results table.
COLUMNS = ("loss", "perplexity", "top1_accuracy", "top5_accuracy", "top10_accuracy", "bits_per_byte")
HEADERS = ("loss", "ppl", "top-1", "top-5", "top-10", "bits/byte")


def read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LibrarianError(f"{what} {path} not found; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LibrarianError(f"{what} {path} is not readable JSON ({type(exc).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise LibrarianError(f"{what} {path} is not a JSON object; {fix}")
    return data


def load_reference(path: str | Path = DEFAULT_REFERENCE) -> dict[str, dict]:
    """Reference run name -> its test metrics."""
    data = read_json(Path(path), "reference file", "restore it with `git checkout results/reference.json`")
    runs = data.get("runs")
    if not isinstance(runs, dict) or not all(isinstance(r, dict) and isinstance(r.get("metrics"), dict) for r in runs.values()):
        raise LibrarianError(f"reference file {path} has no runs with metrics; restore it with `git checkout {path}`")
    return {name: run["metrics"] for name, run in runs.items()}


def format_value(key: str, value) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2%}" if key.endswith("accuracy") else f"{value:.4f}" if key != "perplexity" else f"{value:.3f}"


def comparison(metrics: dict, reference: dict[str, dict]) -> str:
    """A plain-text table: each reference run, this run, and this run's difference from each."""
    rows = [(name, [format_value(k, m.get(k)) for k in COLUMNS]) for name, m in reference.items()]
    rows.append(("this run", [format_value(k, metrics.get(k)) for k in COLUMNS]))
    for name, m in reference.items():
        deltas = []
        for key in COLUMNS:
            ours, theirs = metrics.get(key), m.get(key)
            if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
                delta = ours - theirs
                deltas.append(f"{delta * 100:+.2f}pt" if key.endswith("accuracy") else f"{delta:+.4f}")  # points
            else:
                deltas.append("-")
        rows.append((f"this run - {name}", deltas))
    width = max(len(name) for name, _ in rows)
    lines = [" ".join([f"{'run':<{width}}", *(f"{h:>10}" for h in HEADERS)])]
    lines += [" ".join([f"{name:<{width}}", *(f"{v:>10}" for v in values)]) for name, values in rows]
    return "\n".join(lines)


def compare(metrics_path: str | Path = DEFAULT_METRICS, reference_path: str | Path = DEFAULT_REFERENCE) -> str:
    metrics = read_json(Path(metrics_path), "metrics file", "run the pipeline first (`dvc repro`)")
    return comparison(metrics, load_reference(reference_path))
