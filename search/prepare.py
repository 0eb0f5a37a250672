"""From spec values to a checked search: ``prepare_search(values) -> (spec, groups)``.

One path for the CLI (``densitune search``) and the bench scripts: the search space is checked
before any file is read, then the trained networks are found, the default OOD sets of their data
set filled in (:attr:`densitune.trainables.data.DatasetInfo.default_ood`), the spec built once and
every checkpoint and data set checked: all before Ray starts and before anything is written.
"""

from __future__ import annotations

from typing import Any

from densitune.errors import ConfigError
from densitune.run.runstore import location
from densitune.search import models
from densitune.search.models import ModelGroup
from densitune.search.spec import DEFAULT_EPS_GRID, DEFAULT_EPS_RANGE, SearchSpec, check_density_params, check_space
from densitune.trainables.train.checkpoint import read_config


def check_data(name: str, root: str | None, download: bool = False) -> None:
    """Fail early (before Ray, before writing) if a data set is unknown or absent.

    Loading one item names an unknown set and finds missing files; the set's :func:`dataset_info` is not asked
    for: for an image folder it decodes up to a thousand images for a mean and std that no search uses."""
    from densitune.trainables.data import load_split

    load_split(name, "test", root=root, download=download, limit=1)


def build_spec(values: dict[str, Any], id_dataset: str) -> SearchSpec:
    """The spec of ``values`` (YAML/flag keys, ``models`` ignored), OOD sets defaulting to ``id_dataset``'s."""
    from densitune.trainables.data import dataset_info

    kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k != "models"}
    kw.setdefault("experiment", "search")
    val_ood_protocol = kw.get("protocol", "val-ood") == "val-ood"
    val_default: str | tuple[str, ...] | None = None
    test_default: tuple[str, ...] = ()
    if ("val_ood" not in kw and val_ood_protocol) or "test_ood" not in kw:  # (a folder's info decodes images)
        val_default, test_default = dataset_info(id_dataset, root=kw.get("data_root")).default_ood or (None, ())
    kw.setdefault("val_ood", val_default if val_ood_protocol else None)
    kw.setdefault("test_ood", test_default)
    if (kw["val_ood"] is None and val_ood_protocol) or not kw["test_ood"]:
        raise ConfigError(f"no default OOD sets for {id_dataset!r}: pass --val-ood and --test-ood")
    return SearchSpec(**kw)


def prepare_search(values: dict[str, Any]) -> tuple[SearchSpec, list[ModelGroup]]:
    """The checked spec and the model groups it searches.

    ``values`` are spec keys (:func:`densitune.search.spec.spec_keys`) with ``models`` (the folder of
    trained networks) required.

    Raises:
        DensituneError: a bad name or value, no or corrupt models, a missing data set.
    """
    # The space first: a bad name or value fails before any file is read.
    check_space(tuple(values.get("densities", ("gmm_sum",))), tuple(values.get("scores", ("density",))),
                tuple(values.get("eps_grid", DEFAULT_EPS_GRID)), tuple(values.get("eps_range", DEFAULT_EPS_RANGE)),
                tuple(values.get("dims", ())))
    check_density_params(values.get("density_params", {}))
    if not values.get("models"):
        raise ConfigError("no models folder given (key models / --models)")
    models_dir = location(values["models"])
    groups = models.discover(models_dir)
    ids = {g.dataset for g in groups}
    if len(ids) != 1:
        raise ConfigError(f"models under {models_dir} were trained on several data sets {sorted(ids)}; pass --models for one")
    id_dataset = ids.pop()
    spec = build_spec(values, id_dataset)
    groups = models.select(groups, spec.dims, spec.backbones, spec.losses)
    check_search(spec, groups)
    return spec, groups


def check_search(spec: SearchSpec, groups: list[ModelGroup]) -> None:
    """The checks of a spec and the model groups it searches, before Ray starts: the in-distribution set is
    not an OOD set, every checkpoint reads (weights included), every data set is there.

    Raises:
        DensituneError: the first check that fails (one line naming the set or the file).
    """

    ids = {g.dataset for g in groups}
    if len(ids) != 1:
        raise ConfigError(f"the networks searched were trained on several data sets {sorted(ids)}; search one at a time")
    id_dataset = ids.pop()
    if id_dataset in (*(spec.val_ood or ()), *spec.test_ood):
        raise ConfigError(f"the in-distribution data set {id_dataset!r} cannot also be an OOD set")
    models.check_checkpoints(groups)  # a corrupt model.pt fails here, before Ray starts
    id_root = spec.data_root or read_config(groups[0].checkpoints[0])["config"].get("data_root")
    for name, root in ((id_dataset, id_root), *((n, spec.data_root) for n in (*(spec.val_ood or ()), *spec.test_ood))):
        check_data(name, root)
