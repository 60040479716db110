"""`librarian runs`: the experiments side by side, test metrics first, then only the params that differ.

`dvc exp show` prints every param and every metric of every stage: at 200 columns the test loss and
perplexity are cut off behind the cleaning counters. This reads the same data (`dvc exp show
--json`) and keeps what tells runs apart:

    run          loss      ppl  top-1   top-5  top-10 bits/byte precision train.lr
    workspace  6.7184  827.494  3.18%  11.53%  16.56%    3.1678  cpu/bf16    0.001
    main       6.3317  562.103  3.34%  12.97%  21.77%    2.9855  cpu/fp32    0.003
    lr-a       6.7184  827.494  3.18%  11.53%  16.56%    3.1678  cpu/bf16    0.001

The precision column is the train stage's device and precision (metrics/train/metrics.json): a
model trained in bf16 and one in float32 are not the same run.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd

from librarian.cli.dvc_cli import dotted, dvc_json
from librarian.cli.results import format_value, metrics_frame, text_table

TEST_METRICS = "metrics/metrics.json"  # the evaluate stage's output: test metrics as flat keys
TRAIN_METRICS = "metrics/train/metrics.json"  # the train stage's summary: where the model was computed
PARAMS = "params.yaml"


def rows(exp_show: list[dict]) -> dict[str, dict]:
    """Run name -> its `data` in `dvc exp show --json`: the workspace, each baseline commit, its experiments."""
    found = {}
    for baseline in exp_show:
        name = "workspace" if baseline["rev"] == "workspace" else baseline.get("name") or baseline["rev"][:7]
        found[name] = baseline.get("data") or {}
        for experiment in baseline.get("experiments") or []:
            tip = experiment["revs"][0]
            found[experiment.get("name") or tip.get("name") or tip["rev"][:7]] = tip.get("data") or {}
    return found


def _file_data(data: dict, kind: str, path: str) -> dict:
    return ((data.get(kind) or {}).get(path) or {}).get("data") or {}


def trained_in(data: dict) -> str:
    """"cpu/bf16": the device and precision the train stage ran in (librarian/core/precision.py); "-" before it recorded them."""
    train = _file_data(data, "metrics", TRAIN_METRICS)
    return f"{train['device']}/{train['precision']}" if {"device", "precision"} <= train.keys() else "-"


def differing_params(params: dict[str, dict]) -> pd.DataFrame:
    """Run name -> its params (dotted keys), only the keys whose values are not the same in every run."""
    # object dtype: a key missing in one run must not turn the others' ints into floats (1000 -> 1000.0)
    flat = pd.DataFrame([dotted(p) for p in params.values()], index=list(params), dtype=object)
    # Lists (samples.prompts) cannot be compared as such: compare their JSON text.
    as_text = flat.apply(lambda col: col.map(lambda v: json.dumps(v, sort_keys=True)))
    differ = [key for key in flat.columns if as_text[key].nunique(dropna=False) > 1]
    return flat[differ].apply(lambda col: col.map(lambda v: "-" if _missing(v) else str(v)))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def runs_table(exp_show: list[dict], width: int | None = None) -> str:
    """The metrics and the differing params, one table if it fits `width` (default: the terminal's);
    else the metrics, then the params beneath in as many tables as it takes, each within `width`."""
    width = width or shutil.get_terminal_size((WIDTH, 24)).columns
    found = rows(exp_show)
    metrics = metrics_frame({name: _file_data(data, "metrics", TEST_METRICS) for name, data in found.items()})
    shown = metrics.apply(lambda col: col.map(lambda v: format_value(col.name, v)))
    shown["precision"] = [trained_in(data) for data in found.values()]
    params = differing_params({name: _file_data(data, "params", PARAMS) for name, data in found.items()})
    whole = text_table(shown.join(params))
    if params.empty or _widest(whole) <= width:
        return whole
    return "\n\n".join([text_table(shown), *(text_table(params[group], corner="params of")
                                              for group in _column_groups(params, width))])


WIDTH = 100  # when there is no terminal to measure (a pipe, a file)


def _widest(table: str) -> int:
    return max(map(len, table.splitlines()))


def _column_groups(frame: pd.DataFrame, width: int) -> list[list[str]]:
    """The frame's columns in order, cut into runs of columns whose table fits `width` (one column at least)."""
    groups: list[list[str]] = []
    for column in frame.columns:
        if groups and _widest(text_table(frame[[*groups[-1], column]])) <= width:
            groups[-1].append(column)
        else:
            groups.append([column])
    return groups


def runs(all_commits: bool = False) -> str:
    return runs_table(dvc_json("exp", "show", *(["--all-commits"] if all_commits else [])))

