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

from densitune.errors import ConfigError
from densitune.search.safe_yaml import echo, load_yaml

_STR, _INT, _NUM, _BOOL = "a string", "an integer", "a number", "true or false"
_STRS, _INTS, _NUMS = "a list of strings", "a list of integers", "a list of numbers"

#: key -> what its value must be (None allowed where the spec allows it).
KEYS: dict[str, tuple[str, bool]] = {
    "experiment": (_STR, False), "models": (_STR, True), "val_ood": (_STR, True), "test_ood": (_STRS, False),
    "protocol": (_STR, False), "proxy_attack": (_STR, False), "proxy_eps": (_NUM, False),
    "densities": (_STRS, False), "scores": (_STRS, False), "eps_grid": (_NUMS, False), "eps_range": (_NUMS, False),
    "dims": (_INTS, False), "backbones": (_STRS, False), "losses": (_STRS, False), "sampler": (_STR, False),
    "num_samples": (_INT, True), "seed": (_INT, False), "metric": (_STR, False), "data_root": (_STR, True),
    "eval_limit": (_INT, True), "batch_size": (_INT, False), "density_params": ("a mapping", False),
    "attacks": (_STRS, False), "attack_eps": (_NUM, False), "attack_steps": (_INT, False),
}


def _is(kind: str, v: Any) -> bool:
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    checks = {
        _STR: lambda: isinstance(v, str), _INT: lambda: isinstance(v, int) and not isinstance(v, bool),
        _NUM: lambda: num(v), _BOOL: lambda: isinstance(v, bool),
        _STRS: lambda: isinstance(v, list) and all(isinstance(x, str) for x in v),
        _INTS: lambda: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        _NUMS: lambda: isinstance(v, list) and all(num(x) for x in v),
        "a mapping": lambda: isinstance(v, dict),
    }
    return checks[kind]()


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
    for key, value in data.items():
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(KEYS))}"
            raise ConfigError(f"{p}: unknown key {echo(key)}{hint}")
        kind, nullable = KEYS[key]
        if value is None and nullable:
            continue
        if key in ("test_ood", "densities", "scores", "attacks", "backbones", "losses") and isinstance(value, str):
            data[key] = value = [value]  # a single name is a list of one
        if key in ("dims", "eps_grid") and isinstance(value, (int, float)) and not isinstance(value, bool):
            data[key] = value = [value]
        if not _is(kind, value):
            raise ConfigError(f"{p}: key {key!r} must be {kind}, got {echo(value)}")
    if "eps_range" in data and len(data["eps_range"]) != 2:
        raise ConfigError(f"{p}: key 'eps_range' must be [low, high], got {echo(data['eps_range'])}")
    return data
