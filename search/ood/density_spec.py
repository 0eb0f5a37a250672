"""A density (or fitted score) named with its parameters, as one typed value; readable without importing torch.

:class:`DensitySpec` is what the search passes between its layers (spec -> space -> trial -> evaluate -> workspace
-> scoring): the registered name and the constructor parameters. JSON appears only at the boundaries: the results
store's ``density`` / ``density_params`` columns (:meth:`DensitySpec.from_columns`, :meth:`DensitySpec.params_json`)
and the disk cache's keys (:meth:`DensitySpec.params_json`, :meth:`DensitySpec.to_json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from densitune.errors import ConfigError

if TYPE_CHECKING:
    from densitune.search.ood.densities import Density

__all__ = ["DensitySpec"]


@dataclass(frozen=True, eq=False)
class DensitySpec:
    """A registered density or fitted score (``name``; ``""`` for a score without one) and its parameters.

    ``params`` is copied, with its keys sorted, when the spec is made; equality and hash go by the name and the
    parameters' JSON, so two specs of equal parameters are one cache entry. Picklable (it travels to Ray trials).
    """

    name: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"a density name must be a string, got {self.name!r}")
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"parameters of density {self.name!r} must be a mapping, got {self.params!r}")
        object.__setattr__(self, "params", dict(sorted(self.params.items())))
        if not self.name and self.params:
            raise ConfigError(f"parameters without a density: {dict(self.params)}")
        try:
            self.params_json()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"parameters of density {self.name!r} are not JSON values: {e}") from None

    def params_json(self) -> str:
        """The parameters as sorted-key JSON: the results' ``density_params`` column and part of cache keys."""
        return json.dumps(dict(self.params), sort_keys=True)

    def to_json(self) -> str:
        """``{"name": ..., "params": {...}}`` as sorted-key JSON (inverse: :meth:`from_json`)."""
        return json.dumps({"name": self.name, "params": dict(self.params)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DensitySpec:
        """The spec :meth:`to_json` wrote.

        Raises:
            ConfigError: not such a JSON object.
        """
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"not a density spec: {e}") from None
        if not isinstance(d, dict) or set(d) != {"name", "params"}:
            raise ConfigError(f"not a density spec (expected the keys name, params): {text!r}")
        return cls(d["name"], d["params"])

    @classmethod
    def from_columns(cls, density: str | None, density_params: str | None) -> DensitySpec:
        """The spec a result row records in its ``density`` and ``density_params`` (JSON) columns."""
        try:
            params = json.loads(density_params or "{}")
        except json.JSONDecodeError as e:
            raise ConfigError(f"density_params is not JSON: {e}") from None
        return cls(density or "", params)

    def build(self) -> Density:
        """The unfitted density (:func:`~densitune.search.ood.densities.create_density`; imports torch)."""
        from densitune.search.ood.densities import create_density

        if not self.name:
            raise ConfigError("no density to build")
        return create_density(self.name, **self.params)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DensitySpec):
            return NotImplemented
        return (self.name, self.params_json()) == (other.name, other.params_json())

    def __hash__(self) -> int:
        return hash((self.name, self.params_json()))

    def __str__(self) -> str:
        """``name`` or ``name(k=v, ...)``."""
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})" if args else self.name
