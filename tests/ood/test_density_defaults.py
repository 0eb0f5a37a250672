"""The torch-free table of default density parameters agrees with the registered densities themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from densitune.search.ood.densities import DENSITIES, FITTED_SCORES, create_density
from densitune.search.ood.density_defaults import DEFAULT_PARAMS, default_params


@pytest.mark.parametrize("name", [*DENSITIES.names(), *FITTED_SCORES.names()])
def test_defaults_match_the_registered_factory(name):
    assert name in DEFAULT_PARAMS, f"add {name!r} to densitune.search.ood.density_defaults.DEFAULT_PARAMS"
    assert default_params(name) == create_density(name).get_params()


@pytest.mark.process
def test_report_names_non_default_params_without_importing_torch():
    code = ("import sys; from densitune.search.report.tables import short_params; "
            "print(short_params('kde', '{\"bandwidth\": 0.5, \"max_train\": null, \"random_state\": 0, \"chunk_size\": null}'), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["bandwidth=0.5", "False"]
