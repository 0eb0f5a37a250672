"""Training and searching from Python (notebooks, bench scripts, tests): ``densitune.run_training(...)`` and
``densitune.run_search(...)``, named apart from the ``densitune.trainables`` and ``densitune.search`` packages.

Each runs the same service as the command line (:mod:`densitune.app.train`, :mod:`densitune.app.search`):
the writer lock, the Ray session, the checks. A finished run returns its outcome; a run that stopped
raises its error (:class:`~densitune.run.console.Interrupted` for Ctrl-C), whose message says what
finished and that the same call with ``resume=True`` continues it.
"""

from __future__ import annotations

from typing import Any

from densitune.app.search import SearchOptions, SearchOutcome, search
from densitune.app.train import TrainGrid, TrainOptions, TrainOutcome, train
from densitune.app.tune import TuneOptions, TuneOutcome
from densitune.app.tune import tune as tune_service
from densitune.errors import ConfigError


def _split(settings: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the settings named in ``fields``, the others)."""
    return {k: v for k, v in settings.items() if k in fields}, {k: v for k, v in settings.items() if k not in fields}


def run_training(out: str = "densitune-runs", **settings: Any) -> TrainOutcome:
    """Train a grid of networks into the run ``out`` (a folder or ``s3://bucket/prefix``).

    ``settings``: :class:`~densitune.app.train.TrainGrid` fields (``backbones``, ``dims``, ``losses``, ``seeds``,
    ``epochs``, ``dataset``, ...), :class:`~densitune.app.train.TrainOptions` fields (``num_cpus``, ``resume``,
    ``quiet``, ...), or ``networks``: a list of :class:`~densitune.trainables.train.config.TrainConfig` instead of a grid.

    >>> densitune.run_training("runs/x", dims=[8], epochs=3, num_cpus=2).summary   # doctest: +SKIP
    'trained 1 model(s): /abs/runs/x/models/default'
    """
    grid, rest = _split(settings, set(TrainGrid.__dataclass_fields__))
    if "networks" in rest and grid:
        raise ConfigError(f"pass networks or grid settings ({', '.join(sorted(grid))}), not both")
    axes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in grid.items()}
    networks = tuple(rest.pop("networks")) if "networks" in rest else TrainGrid(**axes)
    outcome = train(TrainOptions(out=out, networks=networks, **rest))
    outcome.raise_for_status()
    return outcome


def run_search(out: str = "densitune-runs", **settings: Any) -> SearchOutcome:
    """Search the networks trained into the run ``out`` (or under ``models=...``); the outcome holds the best table.

    ``settings``: search spec keys (``experiment``, ``densities``, ``scores``, ``eps_grid``, ``test_ood``, ...; the
    keys of ``densitune search --spec``) and :class:`~densitune.app.search.SearchOptions` fields (``num_cpus``,
    ``resume``, ``max_concurrent``, ``quiet``, ...).

    >>> print(densitune.run_search("runs/x", densities=["gmm_sum"], eps_grid=[0, 0.01]).best)   # doctest: +SKIP
    """
    options, values = _split(settings, set(SearchOptions.__dataclass_fields__) - {"values"})
    outcome = search(SearchOptions(out=out, values=values, **options))
    outcome.raise_for_status()
    return outcome


def tune(out: str = "densitune-runs", **settings: Any) -> TuneOutcome:
    """Tune the networks themselves (D, loss, λ, backbone) into the run ``out``: networks trained on demand,
    weak ones stopped early, then the full search of the best (``densitune tune``).

    ``settings``: :class:`~densitune.app.tune.TuneOptions` fields (``d_range``, ``dims``, ``losses``, ``lam_range``,
    ``num_networks``, ``epochs``, ``rung_grid``, ``keep``, ``final_seeds``, ``time_budget``, ``num_cpus``, ...).

    >>> densitune.tune("runs/x", d_range=(2, 64), losses=("ce", "contrastive"), num_networks=8).trials[0]   # doctest: +SKIP
    """
    tuples: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    outcome = tune_service(TuneOptions(out=out, **tuples))
    outcome.raise_for_status()
    return outcome
