"""The search spec keys have one home (SearchSpec's fields): the README table, the YAML loader and the
`densitune search` flags all agree with it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from densitune.checks import INTEGER, MAPPING, NUMBER, STRING, ListOf
from densitune.cli import _search_values, build_parser
from densitune.errors import ConfigError
from densitune.search.spec import SearchSpec, SpecKey, keys_markdown, spec_keys
from densitune.search.spec_file import load_spec_file

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_rows() -> dict[str, list[str]]:
    text = README.read_text()
    block = text[text.index("<!-- spec-keys:start -->"):text.index("<!-- spec-keys:end -->")]
    rows = [ln for ln in block.splitlines() if ln.startswith("| `")]
    return {re.match(r"\| `(\w+)`", r).group(1): [c.strip() for c in r.strip("|").split("|")] for r in rows}


def _sample(key: SpecKey):
    """A valid YAML value of ``key`` that is not its default (so a lost value shows)."""
    if key.name == "eps_range":
        return [0.002, 0.2]
    first = key.value[0]
    if key.choices:  # fixed names: the last one (never the default)
        return list(key.choices[-2:]) if isinstance(first, ListOf) else key.choices[-1]
    if isinstance(first, ListOf):
        item = first.item
        return ["a-set", "b-set"] if item is STRING else [3, 5] if item is INTEGER else [0.25, 0.5]
    return {STRING: "/abs/x", INTEGER: 7, NUMBER: 0.125, MAPPING: {"kde": {"bandwidth": [0.5]}}}[first]


def test_readme_table_is_generated_from_the_spec():
    assert keys_markdown() in README.read_text()
    fields = {f.name for f in dataclasses.fields(SearchSpec)}
    assert set(_readme_rows()) == fields | {"models"}


@pytest.mark.parametrize("key", spec_keys(), ids=lambda k: k.name)
def test_each_key_reads_the_same_from_yaml_and_flags(tmp_path, key):
    value = _sample(key)
    readme = _readme_rows()[key.name]
    assert readme[1] == " ".join(f"`{f}`" for f in key.flags)  # the flags the README names
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump({key.name: value}))
    assert load_spec_file(f) == {key.name: value}  # the real YAML loader accepts the key
    parser = build_parser()
    from_file = _search_values(parser.parse_args(["search", "--spec", str(f)]))
    assert from_file[key.name] == value
    if not key.flags:
        return
    argv = ["search", key.flags[-1], *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    from_flags = _search_values(parser.parse_args(argv))  # the real argparse parser
    assert from_flags == {key.name: value}


def test_wrong_type_names_the_key_and_the_declared_value(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("attack_steps: many\n")
    with pytest.raises(ConfigError, match=f"{f}: key 'attack_steps' must be an integer, got 'many'"):
        load_spec_file(f)
