"""`librarian plots`: the pipeline's curves as PNG images and one self-contained HTML page, offline.

`dvc plots show` writes a page that loads Vega from a CDN, so it is blank without a network. This
asks DVC for the same plots (the definitions in dvc.yaml, DVC's templates, any revisions, through
`dvc plots show/diff --json`) and renders them with vl-convert-python, which carries Vega and
Vega-Lite: a PNG per plot, and an index.html with the JavaScript inlined, nothing to download.

    librarian plots                        # the workspace's curves, into dvc_plots/offline/
    librarian plots HEAD lr-high           # revisions or experiments side by side, like `dvc plots diff`
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from librarian.cli.dvc_cli import IN_PROJECT, dvc_json
from librarian.core import paths
from librarian.core.errors import LibrarianError
from librarian.core.io import atomic_dir

DEFAULT_OUT = Path("dvc_plots/offline")
# What marks a folder as this command's output, so a rerun may replace it and nothing else.
GENERATOR = '<meta name="generator" content="librarian plots">'


def collect(revisions: list[str]) -> dict[str, dict]:
    """Plot id -> its Vega-Lite spec, data included, as DVC fills its templates."""
    fix = "name commits or experiments that exist (`dvc exp show` lists them)" if revisions else IN_PROJECT
    plots = dvc_json("plots", *(["diff", *revisions] if revisions else ["show"]), fix=fix).get("data") or {}
    specs = {plot_id: entry["content"] for plot_id, entries in plots.items()
             for entry in entries if entry.get("type") == "vega"}
    if not specs:
        # Outside a DVC project too, `dvc plots show` prints nothing and succeeds.
        raise LibrarianError("DVC found no curves to draw; run this in the project folder (the one with dvc.yaml) "
                             "once the pipeline has run (`dvc repro`)")
    return specs


# Folders every curve's path has (metrics/<stage>/plots/metrics/<curve>.tsv, with ../ when DVC runs in a
# subfolder): they tell no plot apart.
_SHARED_FOLDERS = {"metrics", "plots", "..", "."}


def file_names(plot_ids: list[str]) -> dict[str, str]:
    """A short file name per plot: its name (loss.png, lr.png), else, where two would clash, its stage's
    folder too (train_speed_lr.png, finetune_speed_lr.png), else its whole id."""
    def short(plot_id: str) -> str:
        return Path(plot_id).stem

    def staged(plot_id: str) -> str:
        return "_".join(p for p in Path(plot_id).with_suffix("").parts if p not in _SHARED_FOLDERS)

    names = {}
    for namer in (short, staged, lambda plot_id: plot_id.replace("/", "_")):
        taken = [namer(plot_id) for plot_id in plot_ids]
        for plot_id, name in zip(plot_ids, taken):
            if plot_id not in names and taken.count(name) == 1 and f"{name}.png" not in names.values():
                names[plot_id] = name + ".png"
    return names


def page(specs: dict[str, dict], names: dict[str, str]) -> str:
    """One HTML page drawing every plot, with Vega, Vega-Lite and Vega-Embed inlined."""
    import vl_convert

    # "</" inside a <script> would end it early: JSON may escape the slash.
    charts = json.dumps([{"id": f"plot-{i}", "spec": spec} for i, spec in enumerate(specs.values())])
    charts = charts.replace("</", "<\\/")
    divs = "\n".join(f'<figure><div id="plot-{i}"></div><figcaption><a href="{html.escape(names[plot_id])}">'
                     f"{html.escape(plot_id)}</a></figcaption></figure>" for i, plot_id in enumerate(specs))
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{GENERATOR}
<title>Librarian curves</title>
<style>body {{ font-family: sans-serif; }} figure {{ display: inline-block; margin: 1em; }}</style>
<script>{vl_convert.javascript_bundle()}</script>
</head>
<body>
{divs}
<script>
for (const chart of {charts}) vegaEmbed("#" + chart.id, chart.spec, {{renderer: "svg"}}).catch(console.error);
</script>
</body>
</html>
"""


def check_replaceable(out: Path) -> None:
    """Only an earlier output of this command may be replaced: never a folder with anything else in it."""
    if not out.exists():
        return
    index = out / "index.html"
    ours = out.is_dir() and index.is_file() and GENERATOR in index.read_text(encoding="utf-8", errors="replace")
    others = [p.name for p in out.iterdir() if p.name != "index.html" and p.suffix != ".png"] if ours else [out.name]
    paths.check_replaceable(out, others, "{out} exists and was not written by `librarian plots`; "
                                         "give another folder with --out, or move that one away")


def render(revisions: list[str] | None = None, out: str | Path = DEFAULT_OUT) -> list[Path]:
    """Write OUT/index.html and a PNG per plot; returns the files written."""
    import vl_convert

    out = Path(out)
    check_replaceable(out)
    specs = collect(list(revisions or []))
    names = file_names(list(specs))
    with atomic_dir(out) as tmp:
        for plot_id, spec in specs.items():
            (tmp / names[plot_id]).write_bytes(vl_convert.vegalite_to_png(spec, scale=2))
        (tmp / "index.html").write_text(page(specs, names), encoding="utf-8")
    return [out / "index.html", *(out / name for name in names.values())]
