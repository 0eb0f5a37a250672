"""Search specs from YAML files: the same keys as :class:`densitune.search.spec.SearchSpec`, plus ``models``.

Checked on load: an unknown key, or a value of the wrong type, is a one-line error that
names the file and the key (with the closest known key for a typo). Example::

    experiment: cifar-eps
    models: runs/models/cifar          # where `densitune train` put the networks
    protocol: val-ood                  # or adv-proxy / id-only
    val_ood: folder:data/tiny-imagenet-val
    test_ood: [svhn, cifar100, mnist]
    densities: [gmm_sum, kde]
    density_params: {kde: {bandwidth: [scott, 0.5, 1.0]}}
    scores: [density]
    eps_grid: [0, 0.0005, 0.001, 0.002, 0.005]
    dims: [256, 512]
    sampler: grid
    metric: auroc
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from densitune.checks import check_path_text, describe, satisfies
from densitune.errors import ConfigError
from densitune.search.safe_yaml import echo, load_yaml
from densitune.search.spec import SpecKey, spec_keys


def _keys() -> dict[str, SpecKey]:
    """key -> its declaration (:func:`densitune.search.spec.spec_keys`: the one list of keys)."""
    return {k.name: k for k in spec_keys()}


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """The checked key -> value mapping of a YAML search spec (no defaults filled in)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search spec file not found: {p}")
    data = load_yaml(p)  # bounded: size cap, no aliases
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a search spec is a mapping of keys to values, got {type(data).__name__}")
    return check_values(data, str(p))


def check_values(data: dict[str, Any], p: str) -> dict[str, Any]:
    """``data`` checked key by key (unknown keys, wrong types; a single value becomes a list of one);
    errors name ``p`` (the file, or where in a file the mapping sits)."""
    keys = _keys()
    for key, value in data.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(keys))}"
            raise ConfigError(f"{p}: unknown key {echo(key)}{hint}")
        k = keys[key]
        if k.is_list and key != "eps_range" and satisfies([value], k.value):
            data[key] = value = [value]  # a single name or number is a list of one
        if not satisfies(value, k.value):
            raise ConfigError(f"{p}: key {key!r} must be {describe(k.value)}, got {echo(value)}")
    if "eps_range" in data and len(data["eps_range"]) != 2:
        raise ConfigError(f"{p}: key 'eps_range' must be [low, high], got {echo(data['eps_range'])}")
    for key in ("data_root", "models"):  # paths in a file are checked like the flags they stand for
        if isinstance(data.get(key), str):
            check_path_text(data[key], f"{p}: key {key!r}")
    for key in ("val_ood", "test_ood"):
        for name in data.get(key) or ():
            if isinstance(name, str) and name.startswith("folder:"):
                check_path_text(name[len("folder:"):], f"{p}: key {key!r}: folder")
    return data
