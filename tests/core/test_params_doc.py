"""The params reference page is rendered from the schema: checked in, never stale, complete."""

import pytest
import yaml
from pydantic import BaseModel

from librarian.core import params_doc
from librarian.core.config import Params, load_params
from tests.helpers import ROOT

PAGE = ROOT / params_doc.PAGE


def rendered() -> str:
    return params_doc.render(load_params(ROOT / "params.yaml").model_dump())


def leaf_keys(node, prefix=""):
    """Every dotted key of a params mapping that holds a value (a list is a value)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def schema_fields(model: type[BaseModel] = Params, prefix=""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from schema_fields(field.annotation, f"{prefix}{name}.")


def test_the_checked_in_page_is_not_stale():
    assert PAGE.read_text(encoding="utf-8") == rendered(), (
        f"{params_doc.PAGE} is stale: run `{params_doc.COMMAND}` and commit it")


def test_every_key_of_params_yaml_is_on_the_page():
    page = PAGE.read_text(encoding="utf-8")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    keys = list(leaf_keys(raw))
    assert "chat_data.mix.words" in keys and "samples.prompts" in keys  # nested sections and lists are walked
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"keys of params.yaml missing from {params_doc.PAGE}: {missing}"
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) == len(keys)  # and nothing else: one row per key


def test_every_schema_field_has_a_meaning():
    undescribed = [key for key, field in schema_fields() if not (field.description or "").strip()]
    assert not undescribed, f"fields without a description (doc(...) in librarian/core/config.py): {undescribed}"


def test_a_changed_description_changes_the_page(monkeypatch):
    """The staleness check can fail: the page follows the schema's descriptions."""
    before = rendered()
    monkeypatch.setattr(Params.model_fields["model"].annotation.model_fields["n_head"], "description", "changed heads")
    after = rendered()
    assert after != before and "| `model.n_head` | `4` | int ≥ 1; divides d_model | changed heads |" in after


def test_allowed_is_derived_from_types_bounds_and_rules():
    page = rendered()
    for row in ["| `model.context_length` | `128` | int 1 … 8192 |",  # ge and le on an int
                "| `model.dropout` | `0.2` | number [0, 1) |",  # ge and lt on a float
                "| `data.fraction` | `0.02` | number (0, 1] |",  # gt and le
                "| `train.lr` | `0.0001` | number > 0 |",
                "| `clean.drop_fragments` | `true` | `true` or `false` |",
                "| `model.mlp` | `gelu` | `gelu`, `swiglu`, `relu2` |",  # Literal choices
                "| `model.n_head` | `4` | int ≥ 1; divides d_model |",  # a cross-key rule
                "| `samples.prompts` | `[\"Once upon a time\",",  # a list, as YAML reads it back
                # a pipe in code, as both GitHub and MkDocs show it without ending the cell
                "| `tokenizer.special_tokens` | <code>[\"&lt;&#124;endoftext&#124;&gt;\", ",
                "includes <code>&lt;&#124;endoftext&#124;&gt;</code> and `<pad>`, no repeats |"]:
        assert row in page, row
    assert params_doc.INTRO in page


def test_check_and_write(tmp_path, capsys):
    page = tmp_path / "docs" / "params.md"
    args = ["--params", str(ROOT / "params.yaml"), "--page", str(page)]
    with pytest.raises(SystemExit) as stop:  # not written yet
        params_doc.main(["--check", *args])
    assert stop.value.code == 1
    params_doc.main(["--write", *args])
    assert page.read_text(encoding="utf-8") == rendered()
    params_doc.main(["--check", *args])  # fresh: returns
    page.write_text(rendered().replace("transformer blocks", "blocks"), encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        params_doc.main(["--check", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "is stale" in err and params_doc.COMMAND in err
