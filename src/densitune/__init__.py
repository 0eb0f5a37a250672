"""densitune: hyperparameter search for feature-density uncertainty (DDU / KDE + input perturbation).

Layers (imports point one way, down this list):

* ``densitune`` core — :mod:`~densitune.errors`, :mod:`~densitune.registry`,
  :mod:`~densitune.checks`, :mod:`~densitune.device`, :mod:`~densitune.ray_runtime`:
  imported by both sides, importing neither.
* :mod:`densitune.trainables` — ``data`` (data sets), ``nets`` (backbones, spectral norm,
  losses), ``train`` (config, checkpoint, the training loop and its Tune trainable).
* :mod:`densitune.search` — ``ood`` (densities, scores, perturbation, attacks, metrics:
  pure maths, no Ray, no files, no training loop), ``results`` (the Parquet store and
  reports), then the spec, space, trial evaluation and the Ray Tune/Optuna adapter.
* :mod:`densitune.cli` — the ``densitune`` command; imported by nothing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("densitune")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
