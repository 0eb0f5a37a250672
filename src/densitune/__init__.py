"""densitune: hyperparameter search for feature-density uncertainty (DDU / KDE + input perturbation).

Layers (imports point one way, down this list):

* ``densitune`` core — :mod:`~densitune.errors`, :mod:`~densitune.registry`,
  :mod:`~densitune.checks`, :mod:`~densitune.device`, :mod:`~densitune.run.ray_runtime`:
  imported by both sides, importing neither.
* :mod:`densitune.trainables` — ``data`` (data sets), ``nets`` (backbones, spectral norm,
  losses), ``train`` (config, checkpoint, the training loop and its Tune trainable).
* :mod:`densitune.search` — ``ood`` (densities, scores, perturbation, attacks, metrics:
  pure maths, no Ray, no files, no training loop), ``results`` (the Parquet store and
  reports), then the spec, space, trial evaluation and the Ray Tune/Optuna adapter.
* :mod:`densitune.app` — the services (train, search, studies, demo): typed options in, an outcome out;
  they hold the writer lock and run the Ray session. :func:`run_training` and :func:`run_search` are
  their library face, re-exported here lazily.
* :mod:`densitune.cli` — the ``densitune`` command (parse -> one service or API call -> print); imported by nothing.
* :mod:`densitune.api` — the library API (:func:`fit_detector`, :func:`load_detector`, ...), like the
  CLI a facade over the layers, re-exported here lazily: ``import densitune`` stays light.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("densitune")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

#: The library API (densitune.api), imported on first use.
_API = ("Detector", "FeatureModel", "TorchvisionFeatures", "export_detector", "fit_detector", "load_detector")

#: Training and searching from Python (densitune.app.library), imported on first use.
_LIBRARY = ("run_search", "run_training", "tune")

__all__ = ["__version__", *_API, *_LIBRARY]


def __getattr__(name: str):
    if name in _API:
        from densitune import api

        return getattr(api, name)
    if name in _LIBRARY:
        from densitune.app import library

        return getattr(library, name)
    raise AttributeError(f"module 'densitune' has no attribute {name!r}")
