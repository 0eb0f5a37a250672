"""YAML search specs: loaded, checked key by key, and equal to the same spec given as flags."""

from __future__ import annotations

import pytest

from densitune.cli import _search_values, build_parser
from densitune.errors import ConfigError
from densitune.search.prepare import build_spec
from densitune.search.spec_file import load_spec_file

YAML = """
experiment: yaml-run
val_ood: digits-blend
test_ood: [digits-rot90, noise-uniform]
densities: [gmm_sum, kde]
density_params: {kde: {bandwidth: [scott, 0.5]}}
scores: [density, msp]
eps_grid: [0, 0.001, 0.01]
dims: [8]
sampler: grid
seed: 3
metric: auprc
"""

FLAGS = ["--experiment", "yaml-run", "--val-ood", "digits-blend", "--test-ood", "digits-rot90", "noise-uniform",
         "--density", "gmm_sum", "kde", "--kde-bandwidth", "scott", "0.5", "--score", "density", "msp",
         "--eps-grid", "0", "0.001", "0.01", "-D", "8", "--sampler", "grid", "--seed", "3", "--metric", "auprc"]


def _spec(argv):
    args = build_parser().parse_args(["search", *argv])
    return build_spec(_search_values(args), "digits")


def test_yaml_equals_flags(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text(YAML)
    assert _spec(["--spec", str(f)]) == _spec(FLAGS)


def test_flags_override_file(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text(YAML)
    spec = _spec(["--spec", str(f), "--seed", "7", "--density", "gmm_max"])
    assert spec.seed == 7 and spec.densities == ("gmm_max",) and spec.scores == ("density", "msp")


@pytest.mark.parametrize(
    "text, message",
    [
        ("epsgrid: [0, 0.1]", "unknown key 'epsgrid' (did you mean 'eps_grid'?)"),
        ("eps_grid: [0, fast]", "key 'eps_grid' must be a list of numbers"),
        ("seed: three", "key 'seed' must be an integer"),
        ("dims: [8.5]", "key 'dims' must be a list of integers"),
        ("eps_range: [0.1]", "key 'eps_range' must be [low, high]"),
        ("- a\n- b", "a search spec is a mapping"),
        ("sampler: [grid", "not valid YAML"),
    ],
)
def test_bad_files_name_the_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_spec_file(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_values_checked_by_the_spec(tmp_path):
    f = tmp_path / "neg.yaml"
    f.write_text("eps_grid: [0, -0.1]\nval_ood: digits-blend\ntest_ood: noise-uniform\n")
    with pytest.raises(ConfigError, match="eps must be a finite number >= 0, got -0.1"):
        _spec(["--spec", str(f)])
    with pytest.raises(ConfigError, match="not found"):
        load_spec_file(tmp_path / "absent.yaml")
