"""The service layer (densitune.app) under the command line: typed options in, an outcome out.

The demo's typed settings are the commands a user would type; bad input to a service is one
ConfigError before anything is written; the library functions train and search a real run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import densitune
from densitune.app.demo import DEMO_GRID, DEMO_SEARCH, DEMO_TRAIN, demo_search_values
from densitune.app.session import Outcome
from densitune.cli import build_parser
from densitune.cli.parser import search_values, train_options
from densitune.errors import ConfigError, DensituneError
from densitune.run.console import Interrupted

CLI = Path(densitune.__file__).parent / "cli"


def test_the_demo_runs_the_commands_it_shows():
    """DEMO_GRID and demo_search_values() are what `densitune train|search` makes of DEMO_TRAIN and DEMO_SEARCH."""
    parser = build_parser()
    train = train_options(parser.parse_args(["train", *DEMO_TRAIN]), [])
    assert train.networks == DEMO_GRID
    args = parser.parse_args(["search", *DEMO_SEARCH])
    assert search_values(args) == demo_search_values() and args.resume
    assert len(DEMO_GRID.configs()) == 8


def test_commands_are_short_and_hold_no_state():
    """Every command is parse -> one call -> print: at most 40 lines; no module-level mutable state in the CLI."""
    for path in CLI.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
                assert node.end_lineno - node.lineno + 1 <= 40, f"{path.name}: {node.name}"
            value = getattr(node, "value", None) if isinstance(node, ast.Assign | ast.AnnAssign) else None
            assert not isinstance(value, ast.Dict | ast.List | ast.Set), f"{path.name}:{node.lineno}: mutable module state"
            if isinstance(value, ast.Call):
                assert getattr(value.func, "attr", getattr(value.func, "id", "")) not in ("ExitStack", "dict", "list", "set")


def test_outcome_status_and_error():
    assert Outcome().status == 0
    assert Outcome(Interrupted("1 of 2 trained; continue with: x")).status == 130
    failed = Outcome(ConfigError("boom"))
    assert failed.status == 2
    with pytest.raises(ConfigError, match="boom"):
        failed.raise_for_status()


@pytest.mark.parametrize("settings, needle", [
    ({"backbones": ["resnet5O"]}, "resnet5O"),
    ({"dims": [0]}, "feature dimension D"),
    ({"num_cpus": 0}, "--num-cpus must be > 0"),
    ({"seeds": [-1]}, "--seeds must be integers >= 0"),
])
def test_bad_training_input_is_one_error_before_anything_is_written(tmp_path, settings, needle):
    out = tmp_path / "run"
    with pytest.raises(DensituneError, match=needle):
        densitune.run_training(str(out), **settings)
    assert not out.exists()


def test_bad_search_input_is_one_error_before_anything_is_written(tmp_path, trained_models):
    out = tmp_path / "run"
    with pytest.raises(DensituneError, match="gmm_summ"):
        densitune.run_search(str(out), models=str(trained_models), densities=["gmm_summ"])
    with pytest.raises(ConfigError, match="--max-concurrent"):
        densitune.run_search(str(out), models=str(trained_models), max_concurrent=0)
    assert not out.exists()


@pytest.mark.ray
def test_library_functions_train_and_search_a_run(tmp_path):
    """densitune.run_training then densitune.run_search: the same services as the command line, from Python."""
    out = str(tmp_path / "run")
    trained = densitune.run_training(out, dims=[4], epochs=1, num_cpus=2, quiet=True)
    assert trained.status == 0 and len(trained.configs) == 1
    assert (Path(trained.models_dir) / trained.configs[0].key / "model.pt").is_file()
    found = densitune.run_search(out, experiment="s", densities=["gmm_sum"], eps_grid=[0, 0.01], test_ood=["noise-uniform"],
                                 eval_limit=100, num_cpus=2, quiet=True)
    assert found.status == 0 and found.trials == 2
    assert "best configuration by validation auroc" in found.best
    again = densitune.run_training(out, dims=[4], epochs=1, num_cpus=2, quiet=True)  # trained already: nothing to do
    assert again.status == 0
