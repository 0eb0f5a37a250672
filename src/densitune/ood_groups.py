"""How far each known OOD set lies from an in-distribution set: ``near`` or ``far``.

The one declaration of the groups the report's summary sorts its columns by (OpenOOD's near / far
split). The data sets' :class:`~densitune.trainables.data.DatasetInfo` take their ``ood_groups``
from here, and the results layer reads it without importing the data code (and so torch).
"""

from __future__ import annotations

#: in-distribution set -> ((OOD set, "near" | "far"), ...)
OOD_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "digits": (("digits-rot90", "near"), ("digits-hflip", "near"), ("digits-blend", "near"),
               ("photo-patches", "far"), ("noise-uniform", "far")),
    "cifar10": (("cifar100", "near"), ("folder:tiny-imagenet-val", "near"), ("svhn", "far"), ("mnist", "far"),
                ("fashionmnist", "far"), ("noise-blobs", "far")),
    "mnist": (("fashionmnist", "near"), ("cifar10", "far"), ("cifar100", "far"), ("svhn", "far"), ("noise-blobs", "far")),
}


def ood_group(id_dataset: str, ood_dataset: str) -> str | None:
    """``"near"`` / ``"far"`` for a known pair; None when either set is not listed."""
    return dict(OOD_GROUPS.get(id_dataset, ())).get(ood_dataset)
