"""The bench suite's shared fixtures: a tiny network trained on the embedded digits, untrained ones at 32×32×3,
PNG folder splits of coloured digits and photo patches, a started Ray, and THE one call that runs a search.

Heavy modules (torch, Ray, densitune's training and search code) are imported inside the functions, so that
``gpu_check.py`` stays Ray-free and the harness test imports nothing heavy.

The wiring to the library is in two functions only, so it can be switched in one place: :func:`train_network`
(today the Ray-free loop ``fit`` + ``save_checkpoint``) and :func:`run_search_config` (today ``prepare_search`` +
``densitune.search.tune.run_search``; the library's ``densitune.run_search(...)`` when it lands).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 32  # image side of the bench's PNG data sets and untrained networks

# ------------------------------------------------------------------------------------------------ networks


def train_network(models_dir: str | Path, device: Any = None, **config: Any) -> Path:
    """Train ``TrainConfig(**config)`` (the embedded digits unless ``dataset`` says otherwise) with the Ray-free loop
    and save it under ``models_dir/<config.key>``; a model already saved there is reused. Returns that folder."""
    from densitune.trainables.train.checkpoint import save_checkpoint
    from densitune.trainables.train.config import TrainConfig
    from densitune.trainables.train.loop import fit

    cfg = TrainConfig(**config)
    folder = Path(models_dir) / cfg.key
    if not (folder / "model.pt").is_file():
        *_, st = fit(cfg, device=device)
        save_checkpoint(folder, config=cfg, model=st.model, loss=st.loss, data=st.data, epoch=st.epoch,
                        metrics=st.metrics)
    return folder


def untrained_net(feature_dim: int, *, backbone: str = "cnn", spectral: bool = False, device: Any = None) -> Any:
    """An untrained ``backbone`` (the tiny ``cnn`` unless named; seed torch first for a reproducible one) on 32×32×3
    inputs, 10 classes, the bench's normalisation (mean 0.5, std 0.25); ``spectral``: with the default spectral
    normalisation."""
    from densitune.trainables.nets.backbones import SpectralConfig, create_model

    model = create_model(backbone, in_channels=3, image_size=SIZE, num_classes=10, feature_dim=feature_dim,
                         mean=(0.5,) * 3, std=(0.25,) * 3, spectral=SpectralConfig() if spectral else None)
    return model.to(device) if device is not None else model


# ------------------------------------------------------------------------------------------------ PNG folders


def colour_digits(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 8, 8) digits in [0, 16] -> (N, 32, 32, 3) uint8: upscaled, shifted by up to 2 px, coloured, noisy."""
    from PIL import Image

    out = np.empty((len(images), SIZE, SIZE, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        big = Image.fromarray((img / 16 * 255).astype(np.uint8)).resize((SIZE - 4, SIZE - 4), Image.BILINEAR)
        canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
        dy, dx = rng.integers(0, 5, size=2)
        canvas[dy:dy + SIZE - 4, dx:dx + SIZE - 4] = np.asarray(big, dtype=np.float32) / 255
        fg, bg = rng.uniform(0.55, 1.0, 3), rng.uniform(0.0, 0.35, 3)
        rgb = bg + canvas[..., None] * (fg - bg) + rng.normal(0, 0.03, (SIZE, SIZE, 3))
        out[i] = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return out


def write_images(folder: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """(N, H, W, 3) uint8 images as PNG files in ``folder`` (in class subfolders ``c<label>`` with ``labels``)."""
    from PIL import Image

    for i, img in enumerate(images):
        sub = folder / (f"c{labels[i]}" if labels is not None else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:05d}.png")


def write_png_splits(root: Path, n_train: int, n_eval: int) -> None:
    """The bench's ``folder:`` data sets under ``root`` (nothing downloaded; written once: a root that already holds
    them is kept): ``id/{train,val,test}`` (class subfolders) of coloured digits (``n_train`` / ``n_eval`` /
    ``n_eval`` images; the three splits never share a source digit), ``ood-blend`` (``n_eval`` means of two digits
    of different classes: near-OOD) and ``ood-photo`` (``n_eval`` 32×32 patches of scikit-learn's flower photo)."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    if (root / "ood-photo").is_dir():
        return
    rng = np.random.default_rng(0)
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    parts = np.split(order, [int(0.6 * len(order)), int(0.8 * len(order))])
    for split, part, n in zip(("train", "val", "test"), parts, (n_train, n_eval, n_eval), strict=True):
        pick = rng.choice(part, size=n)
        write_images(root / "id" / split, colour_digits(digits.images[pick], rng), digits.target[pick])
    a, b = rng.choice(parts[1], size=(2, 4 * n_eval))
    a, b = a[digits.target[a] != digits.target[b]][:n_eval], b[digits.target[a] != digits.target[b]][:n_eval]
    write_images(root / "ood-blend", colour_digits((digits.images[a] + digits.images[b]) / 2, rng))
    photo = load_sample_images().images[1]
    crops = []
    for _ in range(n_eval):
        y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
        crops.append(np.asarray(Image.fromarray(photo[y:y + 64, x:x + 64]).resize((SIZE, SIZE), Image.BILINEAR)))
    write_images(root / "ood-photo", np.stack(crops))


# ------------------------------------------------------------------------------------------------ Ray, search


@dataclass
class RaySession:
    """A Ray this process started: its GCS address and the seconds its start and (after the block) stop took."""

    address: str
    start_s: float
    stop_s: float = 0.0


@contextmanager
def started_ray(num_cpus: int) -> Iterator[RaySession]:
    """A local Ray of ``num_cpus`` CPUs for the block (``densitune.run.ray_runtime.init_ray``, quiet), shut down
    after it; the start and stop are timed on their own."""
    import ray

    from densitune.run.ray_runtime import init_ray

    t0 = time.perf_counter()
    init_ray(num_cpus=num_cpus, quiet=True)
    session = RaySession(ray.get_runtime_context().gcs_address, time.perf_counter() - t0)
    try:
        yield session
    finally:
        t0 = time.perf_counter()
        ray.shutdown()
        session.stop_s = time.perf_counter() - t0


def search_run(root: str | Path, **options: Any) -> Any:
    """Where a search writes under ``root`` (``results/``, ``tune/``, ``cache/``): a ``SearchRun``; ``options``
    (e.g. ``ip_cache=False``) go to it."""
    from densitune.search.tune import SearchRun

    root = Path(root)
    return SearchRun(results_dir=str(root / "results"), storage_path=str(root / "tune"), cache_dir=str(root / "cache"),
                     **options)


def run_search_config(values: dict[str, Any], run: Any, *, progress: bool = False) -> tuple[Any, float]:
    """Run the search the config ``values`` describes (the keys of a spec file or of ``densitune search``'s flags:
    models, val_ood, test_ood, densities, eps_grid, sampler, ...) into ``run`` (:func:`search_run`), through Ray
    Tune on the running Ray. Returns (Tune's result grid, the seconds spent checking the config and finding the
    models before the search started). THE one place the bench calls the search."""
    from densitune.search.prepare import prepare_search
    from densitune.search.tune import run_search

    t0 = time.perf_counter()
    spec, groups = prepare_search(values)
    prepared = time.perf_counter() - t0
    return run_search(spec, groups, run, progress=progress), prepared
