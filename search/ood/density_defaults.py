"""Each registered density's (and fitted score's) default parameters, readable without importing torch.

The reports name a density's parameters that differ from its defaults (``kde bandwidth=0.5``); building the
density to ask it (:func:`densitune.search.ood.densities.create_density`) imports torch, which alone costs
``densitune report`` about 5 s and 650 MB on 2 cores. ``tests/ood/test_density_defaults.py`` checks this table
against ``create_density(name).get_params()`` for every registered name; a name missing here is looked up the
slow way.
"""

from __future__ import annotations

from typing import Any

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "gmm_sum": {"prior": True, "chunk_size": None, "reg_covar": 0.0, "shrinkage": "none", "dtype": "float64"},
    "gmm_max": {"prior": False, "chunk_size": None, "reg_covar": 0.0, "shrinkage": "none", "dtype": "float64"},
    "kde": {"bandwidth": "scott", "max_train": None, "random_state": 0, "chunk_size": None},
    "knn": {"k": 50, "chunk_size": None},
    "rmd": {"reg_covar": 0.0, "chunk_size": None},
    "vim": {"dim": None},
}


def default_params(name: str) -> dict[str, Any]:
    """The default parameters of the density or fitted score ``name`` (torch is imported only for a name not listed)."""
    if name in DEFAULT_PARAMS:
        return dict(DEFAULT_PARAMS[name])
    from densitune.search.ood.densities import create_density

    return create_density(name).get_params()
