"""densitune tune's pieces without Ray: the conditional network space, the rungs, the validation-only rung scoring."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime

import optuna
import pytest

from densitune.errors import ConfigError, DensituneError
from densitune.search import ondemand
from densitune.search.ondemand import NetworkSpace, TuneRun, rung_objective, rungs
from densitune.search.prepare import build_spec
from densitune.search.workspace import Workspace
from densitune.trainables.data import split_key
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.tune import TrainRun


def test_rungs_are_asha_milestones_and_the_last_epoch():
    assert rungs(9) == (1, 3, 9)
    assert rungs(15) == (1, 3, 9, 15)
    assert rungs(1) == (1,)
    assert rungs(10, grace=2, reduction=2) == (2, 4, 8, 10)


def test_space_is_conditional_and_ce_networks_carry_no_lambda():
    space = NetworkSpace(backbones=("cnn",), losses=("ce", "contrastive"), d_range=(2, 64), lam_range=(0.01, 1.0))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base = TrainConfig(epochs=3, lam=0.1)
    drawn = []
    for _ in range(60):
        trial = study.ask()
        space(trial)
        drawn.append(dict(trial.params))
        study.tell(trial, 0.0)
    ce = [p for p in drawn if p["loss"] == "ce"]
    center = [p for p in drawn if p["loss"] == "contrastive"]
    assert ce and center
    assert all("lam" not in p for p in ce) and all(0.01 <= p["lam"] <= 1.0 for p in center)
    assert all(isinstance(p["D"], int) and 2 <= p["D"] <= 64 for p in drawn)
    assert any(p["D"] & (p["D"] - 1) for p in drawn)  # not only powers of two
    # a ce network has the base λ whatever was drawn, so its key is the one `densitune train` gives it
    net = space.network(base, {**ce[0], "lam": 0.5})
    assert net.lam == 0.1 and net.key == replace(base, feature_dim=ce[0]["D"], loss="ce").key
    assert space.network(base, center[0]).lam == center[0]["lam"]


def test_space_refuses_bad_ranges_and_names():
    with pytest.raises(ConfigError, match="one of them"):
        NetworkSpace(backbones=("cnn",), losses=("ce",))
    with pytest.raises(ConfigError, match="LO < HI"):
        NetworkSpace(backbones=("cnn",), losses=("ce",), d_range=(64, 2))
    with pytest.raises(ConfigError, match="0 < LO < HI"):
        NetworkSpace(backbones=("cnn",), losses=("ce",), dims=(8,), lam_range=(0.0, 1.0))
    with pytest.raises(DensituneError, match="unknown loss 'nope'"):
        NetworkSpace(backbones=("cnn",), losses=("nope",), dims=(8,))


def _run(tmp_path, test_ood: tuple[str, ...]) -> TuneRun:
    base = TrainConfig(epochs=3, feature_dim=8, experiment="t")
    spec = build_spec({"experiment": "t", "val_ood": ("digits-blend", "noise-blobs"), "test_ood": test_ood}, "digits")
    train = TrainRun(experiment="t", models_dir=str(tmp_path / "models"), results_dir=str(tmp_path / "results"),
                     storage_path=str(tmp_path / "tune"))
    return TuneRun(experiment="t", train=train, space=NetworkSpace(backbones=("cnn",), losses=("ce",), dims=(8,)),
                   base=base, spec=spec, rung_grid=(("gmm_sum", 0.0), ("gmm_sum", 0.01)))


def test_rung_objective_reads_validation_only(trained_models, tmp_path, monkeypatch):
    """Leakage: every test OOD set swapped, and the ID test split made unreadable: the rung objective and its rows
    are the same, and no test split is ever loaded."""
    checkpoint = str(next((trained_models / "t").glob("cnn-D8-ce-s0-*")))
    cfg = TrainConfig(epochs=3, feature_dim=8, experiment="t")
    loaded: list[tuple[str, str]] = []
    real = split_key.load_split

    def only_validation(name, split, **kw):
        loaded.append((name, split))
        if split == "test":
            raise AssertionError(f"a rung read the test split of {name}")
        return real(name, split, **kw)

    monkeypatch.setattr(split_key, "load_split", only_validation)
    results = []
    for test_ood in (("digits-rot90", "noise-uniform"), ("photo-patches",)):
        monkeypatch.setattr(ondemand, "workspace", lambda *a: Workspace())  # nothing cached from another run
        objective, rows = rung_objective(_run(tmp_path, test_ood), cfg, checkpoint, 3, "trial", datetime(2026, 1, 1, tzinfo=UTC))
        results.append((objective, [(r["ood_dataset"], r["eps"], r["auroc"], r["objective"]) for r in rows]))
        assert len(rows) == 2 * 2  # 2 inner points x 2 validation OOD sets
        assert {r["split"] for r in rows} == {"val"} and {r["stage"] for r in rows} == {"tune"}
        assert {r["tune_status"] for r in rows} == {"rung"} and {r["epoch"] for r in rows} == {3}
        assert {json.loads(r["search_params"])["rung"] for r in rows} == {3}
        # the rung's objective is the best inner point's (each point: the mean over the validation sets)
        per_point = {r["eps"]: r["objective"] for r in rows}
        assert objective == max(per_point.values()) and all(math.isfinite(v) for v in per_point.values())
    assert results[0] == results[1]
    assert loaded and {split for _, split in loaded} <= {"train", "val"}


def test_resume_warm_starts_tpe_with_the_recorded_networks(tmp_path):
    run = replace(_run(tmp_path, ("photo-patches",)),
                  space=NetworkSpace(backbones=("cnn",), losses=("ce", "contrastive"), d_range=(2, 64), lam_range=(0.01, 1.0)))
    done = [{"objective": 0.8, "search_params": json.dumps({"backbone": "cnn", "D": 12, "loss": "contrastive", "lam": 0.3,
                                                            "network": "x", "reused": False})},
            {"objective": 0.7, "search_params": json.dumps({"backbone": "cnn", "D": 5, "loss": "ce", "network": "y"})},
            {"objective": None, "search_params": json.dumps({"backbone": "cnn", "D": 7, "loss": "ce"})}]
    study = optuna.load_study(study_name=None, storage=ondemand.warm_storage(run, done))
    assert [(t.params, t.value) for t in study.trials] == [
        ({"backbone": "cnn", "D": 12, "loss": "contrastive", "lam": 0.3}, 0.8), ({"backbone": "cnn", "D": 5, "loss": "ce"}, 0.7)]
    assert isinstance(study.trials[0].distributions["D"], optuna.distributions.IntDistribution)
