"""Shared fixtures: a real local Ray, and small models trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densitune.trainables.train.checkpoint import save_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit

# Small networks on 2 cores run several times faster on one intra-op thread
# (measured: first CNN epoch 1.8 s with 1 thread vs 10 s with 2).
torch.set_num_threads(1)

#: Small but real: the CNN on the embedded digits, a few epochs.
TINY = dict(backbone="cnn", feature_dim=8, epochs=3, batch_size=64, lr=0.05, dataset="digits")


def train_to(models_dir: Path, experiment: str, **overrides) -> Path:
    """Train one config with the pure loop (no Ray) and store it like the trainable does."""
    cfg = TrainConfig(**{**TINY, "experiment": experiment, **overrides})
    *_, last = fit(cfg)
    d = models_dir / experiment / cfg.key
    save_checkpoint(d, config=cfg, model=last.model, loss=last.loss, data=last.data, epoch=last.epoch, metrics=last.metrics)
    return d


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> Path:
    """A models directory with cnn D=8 (seeds 0 and 1) and cnn D=4 (seed 0)."""
    root = tmp_path_factory.mktemp("models")
    train_to(root, "t", seed=0)
    train_to(root, "t", seed=1)
    train_to(root, "t", seed=0, feature_dim=4)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, no dashboard), started once for the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()
