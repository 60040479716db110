"""The published reference runs (results/reference.json) and how a run compares with them.

    librarian compare                      # metrics/metrics.json against every reference run
    librarian compare --metrics other.json --reference results/reference.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from librarian.core.errors import LibrarianError
from librarian.core.paths import missing_fix

DEFAULT_REFERENCE = Path("results/reference.json")
DEFAULT_METRICS = Path("metrics/metrics.json")
# The held-out metrics every run reports, in the order of the results table (README, docs/results.md).
COLUMNS = ("loss", "perplexity", "top1_accuracy", "top5_accuracy", "top10_accuracy", "bits_per_byte")
HEADERS = ("loss", "ppl", "top-1", "top-5", "top-10", "bits/byte")


def read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LibrarianError(f"{what} {path} not found; {missing_fix(path, fix)}") from None
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


def format_delta(key: str, delta: float) -> str:
    if math.isnan(delta):
        return "-"
    return f"{delta * 100:+.2f}pt" if key.endswith("accuracy") else f"{delta:+.4f}"  # accuracies in points


def metrics_frame(runs: dict[str, dict]) -> pd.DataFrame:
    """Run name -> its test metrics: one row per run, the COLUMNS as numbers (NaN where one is missing)."""
    frame = pd.DataFrame.from_dict({name: dict(m) for name, m in runs.items()}, orient="index")
    return frame.reindex(columns=list(COLUMNS)).apply(pd.to_numeric, errors="coerce").astype(float)


def text_table(frame: pd.DataFrame, corner: str = "run") -> str:
    """A frame of strings as plain text: run names left, values right, metric columns named as in the results table."""
    frame = frame.rename(columns=dict(zip(COLUMNS, HEADERS)))
    frame.columns.name = corner  # printed in the index's header cell
    return frame.to_string()


def comparison(metrics: dict, reference: dict[str, dict]) -> str:
    """A plain-text table: each reference run, this run, and this run's difference from each."""
    runs = metrics_frame({**reference, "this run": metrics})
    ours = runs.loc["this run"]
    deltas = pd.DataFrame([ours - runs.loc[name] for name in reference],
                          index=[f"this run - {name}" for name in reference])
    shown = pd.concat([runs.apply(lambda col: col.map(lambda v: format_value(col.name, v))),
                       deltas.apply(lambda col: col.map(lambda d: format_delta(col.name, d)))])
    return text_table(shown)


def compare(metrics_path: str | Path = DEFAULT_METRICS, reference_path: str | Path = DEFAULT_REFERENCE) -> str:
    metrics = read_json(Path(metrics_path), "metrics file", "run the pipeline first (`dvc repro`)")
    reference = load_reference(reference_path)
    if metrics_frame({"this run": metrics}).isna().all(axis=None):
        raise LibrarianError(f"metrics file {metrics_path} holds none of the test metrics ({', '.join(COLUMNS)}); "
                             f"give the evaluate stage's output, {DEFAULT_METRICS}")
    return comparison(metrics, reference)
