"""Exceptions densitune raises on bad input.

Every error a user can cause derives from :class:`DensituneError`; the CLI prints
its message as one line on stderr and exits non-zero. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class DensituneError(Exception):
    """Base class: a user-facing error with a one-line message."""


class UnknownNameError(DensituneError, KeyError):
    """A name that is not in a registry (backbone, dataset, density, score...)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(DensituneError, ValueError):
    """An invalid configuration value (eps < 0, D <= 0, a bad key...)."""


class DataError(DensituneError, FileNotFoundError):
    """A data set that cannot be loaded (missing root, missing files)."""


class CheckpointError(DensituneError):
    """A checkpoint that is missing or cannot be read."""


class ResultsError(DensituneError):
    """A results directory or Parquet file that is missing, corrupt or foreign."""


class NotFittedError(DensituneError, RuntimeError):
    """A density or score used before ``fit`` (cf. pytorch-ood's RequiresFittingException)."""


class TrainingError(DensituneError):
    """A training trial that failed (diverged, ran out of memory, crashed)."""


class SearchError(DensituneError):
    """A search trial that failed (a density that cannot be fitted, a crash inside the trial)."""


#: Prefix of every StorageError message: how the driver recognises one in a trial's error text.
STORAGE_PREFIX = "cannot write"


class StorageError(DensituneError):
    """A write to the run folder failed (fatal: the run stops at the first one); the message starts with
    :data:`STORAGE_PREFIX` and names the path and the cause."""
