"""The params reference, docs/reference/params.md, rendered from the schema so that it cannot drift.

A key's meaning is its Field description in librarian/core/config.py; what it accepts comes from its
type and constraints, plus the hand-written rule of a cross-key check (the Field's `rule`); its
default is the committed params.yaml's. `--write` renders the page; `--check` fails, in one line,
when the checked-in page is not what the schema renders (tests/core/test_params_doc.py runs it).

    python -m librarian.core.params_doc --write
    python -m librarian.core.params_doc --check
"""

from __future__ import annotations

import argparse
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from librarian.core.config import DEFAULT_PARAMS, RULE, Params, load_params
from librarian.core.errors import LibrarianError
from librarian.core.io import write_text
from librarian.core.stage import run_stage

PAGE = Path("docs/reference/params.md")
COMMAND = "python -m librarian.core.params_doc --write"
INTRO = ("Every key is required; unknown keys, wrong types and out-of-range values stop the stage with one line naming "
         "the key and what it accepts. Defaults are the model card's.")
CODE_WITH_PIPE = re.compile(r"`([^`]*\|[^`]*)`")
HEADER = ("| key | default | allowed | meaning |", "|---|---|---|---|")


def render(defaults: dict, schema: type[BaseModel] = Params) -> str:
    """The reference page: the top-level keys, then one table per section, in the schema's order."""
    sections = {name: field for name, field in schema.model_fields.items() if _section(field)}
    top = [name for name in schema.model_fields if name not in sections]
    lines = ["# Params reference", "",
             f"<!-- Rendered from librarian/core/config.py and params.yaml by `{COMMAND}`: edit those, not this page. -->",
             "", INTRO, ""]
    if top:
        lines += ["## Top level", "", *_table(schema, defaults, "", only=top), ""]
    for name, field in sections.items():
        lines += [f"## `{name}`", "", _cell(field.description or ""), "",
                  *_table(_section(field), defaults[name], f"{name}."), ""]
    return "\n".join(lines)


def _section(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _table(model: type[BaseModel], values: dict, prefix: str, only: list[str] | None = None) -> list[str]:
    return [*HEADER, *(f"| `{key}` | {_default(value)} | {_cell(accepts(field))} | {_cell(field.description or '')} |"
                       for key, field, value in leaves(model, values, prefix, only))]


def leaves(model: type[BaseModel], values: dict, prefix: str = "",
           only: list[str] | None = None) -> Iterator[tuple[str, FieldInfo, object]]:
    """Every key that holds a value (nested sections such as chat_data.mix walked into), with its field and value."""
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        nested = _section(field)
        if nested:
            yield from leaves(nested, values[name], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field, values[name]


def accepts(field: FieldInfo) -> str:
    """What a key accepts: its type and bounds, then the rule a validator checks across keys, if any."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    rule = extra.get(RULE)
    kind = _kind(field.annotation, field.metadata)
    return f"{kind}; {rule}" if rule else kind


def _kind(annotation: object, metadata: list) -> str:
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return _kind(inner, [*metadata, *extra])
    constraints = _constraints(metadata)
    if get_origin(annotation) is Literal:
        return ", ".join(f"`{choice}`" for choice in get_args(annotation))
    if annotation is bool:
        return "`true` or `false`"
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return f"list of {_kind(item, [])}"
    if annotation is str:
        return "non-empty text" if constraints.get("min_length", 0) >= 1 else "text"
    if annotation in (int, float):
        return _bounds("int" if annotation is int else "number", constraints)
    raise TypeError(f"the params reference cannot describe a {annotation!r}; teach params_doc._kind about it")


def _constraints(metadata: list) -> dict:
    """ge, gt, le, lt and min_length, from pydantic's constraint objects and nested Field()s."""
    found = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found |= _constraints(item.metadata)
        for name in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
    return found


def _bounds(kind: str, c: dict) -> str:
    low, high = c.get("ge", c.get("gt")), c.get("le", c.get("lt"))
    if low is not None and high is not None:
        if kind == "int" and "ge" in c and "le" in c:
            return f"int {low:g} … {high:g}"
        return f"{kind} {'[' if 'ge' in c else '('}{low:g}, {high:g}{']' if 'le' in c else ')'}"
    if low is not None:
        return f"{kind} {'≥' if 'ge' in c else '>'} {low:g}"
    if high is not None:
        return f"{kind} {'≤' if 'le' in c else '<'} {high:g}"
    return kind


def _default(value: object) -> str:
    """The value as it would be written in params.yaml, as code."""
    if isinstance(value, list):
        text = json.dumps(value, ensure_ascii=False)  # a flow list YAML reads back, "\n" escapes kept visible
    else:
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()
    return _cell(f"`{text}`")


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell, rendered alike by GitHub and MkDocs.

    A `|` must not end the cell. Outside code, `\\|` is a pipe in both; inside a code span GitHub
    unescapes it but MkDocs prints the backslash, so a code span with a pipe becomes <code> with &#124;.
    """
    text = CODE_WITH_PIPE.sub(lambda m: f"<code>{html.escape(m[1], quote=False).replace('|', '&#124;')}</code>",
                              " ".join(text.split()))
    return text.replace("|", "\\|")


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Render the params reference from the schema and params.yaml.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"write the page (default: {PAGE})")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is not what the schema renders")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the reference page (default: {PAGE})")
    args = parser.parse_args(argv)
    page = render(load_params(args.params).model_dump())
    if args.write:
        write_text(args.page, page)
        print(f"wrote {args.page}")
    elif not args.page.is_file() or args.page.read_text(encoding="utf-8") != page:
        raise LibrarianError(f"{args.page} is stale: it is not what librarian/core/config.py and {args.params} "
                             f"render; run `{COMMAND}` and commit it")


main = run_stage(_main)

if __name__ == "__main__":
    main()
