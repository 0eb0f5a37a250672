"""The Ray Tune training trainable: real trials, checkpoints in the model store, Parquet rows."""

from __future__ import annotations

import json

import pytest

from densitune.results.store import read_results
from densitune.trainables.train.checkpoint import load_model
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.tune import TrainRun, expand_grid, is_trained, run_training

pytestmark = pytest.mark.ray


def test_train_grid_with_ray(ray_session, tmp_path):
    base = TrainConfig(backbone="cnn", feature_dim=4, epochs=2, experiment="g")
    configs = expand_grid(base, {"feature_dim": [4, 6], "loss": ["ce", "contrastive"]})
    assert len(configs) == 4
    run = TrainRun(experiment="g", models_dir=str(tmp_path / "models"), results_dir=str(tmp_path / "results"),
                   storage_path=str(tmp_path / "tune"))
    metrics = run_training(configs[:2], run, verbose=0)
    assert len(metrics) == 2 and all(m["epoch"] == 2 and m["val_accuracy"] > 0.3 for m in metrics)
    for c in configs[:2]:
        assert is_trained(run, c)
        loaded = load_model(run.model_dir(c))
        assert loaded.config == c
    table = read_results(run.results_dir, stage="train")
    assert table.num_rows == 2 * 2  # one row per trial per epoch
    assert sorted(table.column("epoch").to_pylist()) == [1, 1, 2, 2]
    for r in table.to_pylist():  # schema v4: provenance on every training row
        assert r["node"].startswith("ray:") and r["device"] == "cpu" and r["autocast"] is False
        assert set(json.loads(r["data_checksums"])) == {"digits/train", "digits/val"}
        assert r["checkpoints"] == ([str(run.model_dir(next(c for c in configs if c.key == r["trial_id"])))]
                                    if r["epoch"] == 2 else None)
    # already-trained configs are skipped; only the new ones run
    assert run_training(configs[:2], run, verbose=0) == []


def test_training_merges_finished_networks_epoch_files(ray_session, tmp_path):
    """Merged every 4 epoch files: the first two finished networks' 4 files become one, the third's 2 stay."""
    from densitune.results.store import result_files

    base = TrainConfig(backbone="cnn", feature_dim=4, epochs=2, experiment="m")
    configs = expand_grid(base, {"feature_dim": [4, 6, 8]})
    run = TrainRun(experiment="m", models_dir=str(tmp_path / "models"), results_dir=str(tmp_path / "results"),
                   storage_path=str(tmp_path / "tune"), compact_every=4)
    assert len(run_training(configs, run, verbose=0, progress=False)) == 3
    files = sorted(f.name for f in result_files(run.results_dir, "m"))
    assert [f.split("-")[0] for f in files] == ["compact", "train", "train"]
    assert files[1].removesuffix("-e0001.parquet") == files[2].removesuffix("-e0002.parquet")  # one network's epochs
    table = read_results(run.results_dir, stage="train")
    assert sorted(zip(table.column("trial_id").to_pylist(), table.column("epoch").to_pylist())) == sorted(
        (c.key, e) for c in configs for e in (1, 2))
