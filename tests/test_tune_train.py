"""The Ray Tune training trainable: real trials, checkpoints in the model store, Parquet rows."""

from __future__ import annotations

import json

from densitune.search.results.store import read_results
from densitune.trainables.train.checkpoint import load_model
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.tune import TrainRun, expand_grid, is_trained, run_training


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
