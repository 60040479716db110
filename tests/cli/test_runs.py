"""`librarian runs`: its table from `dvc exp show --json` (tests/pipeline/test_experiments.py runs it on real experiments)."""

import subprocess
import sys

from librarian.cli.runs import runs_table
from tests.dvc_project import code_env

CODE_ENV = code_env()
PROMPTS = ["Once upon a time", "User: hi\nAssistant:"]


def data(lr, dropout=0.1, metrics=None, precision="bf16"):
    params = {"seed": 1337, "train": {"lr": lr, "batch_size": 32}, "model": {"dropout": dropout},
              "samples": {"prompts": PROMPTS}}
    out = {"rev": "x", "params": {"params.yaml": {"data": params}}, "metrics": {}}
    if metrics:
        out["metrics"] = {"metrics/clean.json": {"data": {"kept": 400, "loss": 99.0}},
                          "metrics/metrics.json": {"data": metrics},
                          "metrics/train/metrics.json": {"data": {"loss": 7.0, "device": "cpu", "precision": precision}}}
    return out


def metrics(loss):
    return {"loss": loss, "perplexity": 2.718281828 ** loss, "top1_accuracy": 0.4, "top5_accuracy": 0.7,
            "top10_accuracy": 0.8, "bits_per_byte": 0.9, "val": {"loss": 5.0}}


EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": data(0.003, metrics=metrics(2.5)), "experiments": None},
    {"rev": "0123456789abcdef", "name": "main", "data": data(0.003, metrics=metrics(2.5)), "experiments": [
        {"name": "lr-high",
         "revs": [{"rev": "aaaa1111", "name": "lr-high", "data": data(0.01, metrics=metrics(2.25), precision="fp32")}]},
        {"name": None, "revs": [{"rev": "bbbb2222ffff", "name": None, "data": data(0.001, dropout=0.0)}]},  # queued
    ]},
]


def test_runs_table_shows_test_metrics_first_and_only_the_params_that_differ():
    lines = runs_table(EXP_SHOW, width=200).splitlines()  # not the terminal's width: CI's may be 80
    header = ["run", "loss", "ppl", "top-1", "top-5", "top-10", "bits/byte", "precision", "train.lr", "model.dropout"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == ["workspace", "main", "lr-high", "bbbb222"]
    assert rows["lr-high"] == ["2.2500", "9.488", "40.00%", "70.00%", "80.00%", "0.9000", "cpu/fp32", "0.01", "0.1"]
    assert rows["main"][6] == "cpu/bf16"  # the train stage's device and precision, from metrics/train
    assert rows["main"][-2] == "0.003" and rows["main"][0] == "2.5000"  # the test loss, not clean.json's or val's
    assert rows["bbbb222"] == ["-"] * 7 + ["0.001", "0.0"]  # no metrics yet: dashes, never an error


def test_runs_outside_a_project_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "librarian.cli.main", "runs"], cwd=tmp_path, env=CODE_ENV,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: `dvc exp show` failed (ERROR: you are not inside of a DVC repository")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_wide_table_puts_the_params_beneath_the_metrics_within_the_width():
    """The demo's runs differ in many params (420 characters on one line): beneath, in tables that fit."""
    many = {f"param_{i}": {"value": 1000 + i} for i in range(20)}
    show = [{"rev": "workspace", "name": None, "data": data(0.003, metrics=metrics(2.5)), "experiments": None},
            {"rev": "0123456789abcdef", "name": "demo", "data": data(0.01, metrics=metrics(2.25)), "experiments": None}]
    show[1]["data"]["params"]["params.yaml"]["data"] |= many
    text = runs_table(show, width=80)
    assert max(map(len, text.splitlines())) <= 80
    tables = text.split("\n\n")
    assert tables[0].splitlines()[0].split() == ["run", "loss", "ppl", "top-1", "top-5", "top-10", "bits/byte",
                                             "precision"]
    params_shown = [word for table in tables[1:] for word in table.splitlines()[0].split()[2:]]
    assert params_shown == ["train.lr", *(f"param_{i}.value" for i in range(20))]  # each once, in order
    assert "1019" in text and "1019.0" not in text
    assert all([line.split()[0] for line in table.splitlines()[1:]] == ["workspace", "demo"] for table in tables)
    assert runs_table(EXP_SHOW, width=200).count("\n\n") == 0  # a table that fits stays one
