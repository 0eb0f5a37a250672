"""CLI conventions: --version, help on every flag with its default, choices where names are fixed."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import densitune
from densitune.cli import ATTACK_NAMES, FORMATS, VIEWS, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.process
def test_version():
    p = subprocess.run([sys.executable, "-m", "densitune", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"densitune {densitune.__version__}"


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_flag_has_help_and_shows_its_default(command):
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action)
        assert action.help, (command, action.option_strings)
        if not isinstance(action, argparse._StoreTrueAction):  # a switch is off unless given
            assert "default" in text, (command, action.option_strings, text)
        if action.default not in (None, False) and "%(default)" not in action.help:
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert shown in text, (command, action.option_strings, text)
    assert "(default: 15)" in " ".join(_subparsers()["train"].format_help().split())


def test_fixed_names_are_choices_that_match_the_code():
    from densitune.search.ood.attacks import ATTACKS
    from densitune.search.report import tables as report
    from densitune.search.spec import METRICS, PROTOCOLS, SAMPLERS

    assert FORMATS == report.FORMATS and VIEWS == report.VIEWS and set(ATTACK_NAMES) == set(ATTACKS.names())
    subs = _subparsers()
    choices = {(cmd, a.dest): tuple(a.choices) for cmd, sp in subs.items() for a in sp._actions if a.choices}
    assert choices[("search", "protocol")] == PROTOCOLS and choices[("search", "sampler")] == SAMPLERS
    assert choices[("search", "metric")] == tuple(METRICS) and choices[("search", "attacks")] == ATTACK_NAMES
    for cmd in ("report", "best", "query"):
        assert choices[(cmd, "format")] == FORMATS
    assert choices[("report", "view")] == VIEWS


@pytest.mark.process
def test_a_name_outside_the_choices_is_one_line_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "densitune", "search", "--out", str(tmp_path / "run"), "--sampler", "random"],
                       capture_output=True, text=True, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("densitune: error: argument --sampler: invalid choice: 'random'")
    assert not (tmp_path / "run").exists()
