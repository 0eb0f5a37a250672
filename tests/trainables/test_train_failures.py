"""Training that goes wrong: failed training trials, config validation, --resume with a changed config,
foreign / mixed checkpoints in the model store, and concurrent checkpoint writes."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densitune.errors import CheckpointError, ConfigError, DensituneError, TrainingError
from densitune.run.files import temp_path
from densitune.search.models import check_checkpoints, discover
from densitune.trainables.nets.losses import create_loss
from densitune.trainables.train.checkpoint import (
    FORMAT,
    VERSION,
    build_model,
    load_model,
    read_checkpoint,
    read_config,
    save_checkpoint,
)
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import data_description, fit
from densitune.trainables.train.tune import TrainRun, run_training, saved_state

#: Cheap to train: the CNN on 300 digits.
SMALL = dict(backbone="cnn", feature_dim=4, epochs=1, train_limit=300, batch_size=64)


def _run(tmp_path: Path, experiment: str, resume: bool = False) -> TrainRun:
    return TrainRun(experiment=experiment, models_dir=str(tmp_path / "models"), results_dir=str(tmp_path / "results"),
                    storage_path=str(tmp_path / "tune"), resume=resume)


def _untrained_checkpoint(directory: Path, cfg: TrainConfig, epoch: int | None = None) -> Path:
    """A real checkpoint of an untrained network (no training: fast)."""
    data = data_description(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data)
    loss = create_loss(cfg.loss, num_classes=data["num_classes"], feature_dim=cfg.feature_dim, lam=cfg.lam, delta=cfg.delta)
    return save_checkpoint(directory, config=cfg, model=model, loss=loss, data=data,
                           epoch=cfg.epochs if epoch is None else epoch, metrics={"val_accuracy": 0.1})


def _write_meta(directory: Path, meta) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    f = directory / "config.json"
    f.write_text(json.dumps(meta))
    return f


def _meta(**config) -> dict:
    cfg = TrainConfig(**{**SMALL, **config})
    return {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "data": {}, "epoch": cfg.epochs, "metrics": {}}


# ---------------------------------------------------------------------------- 1. failed trials


@pytest.mark.ray
def test_failed_trial_raises_training_error(ray_session, tmp_path):
    cfg = TrainConfig(**SMALL, lr=1e30, experiment="fail")  # the loss becomes NaN in epoch 1
    with pytest.raises(TrainingError) as info:
        run_training([cfg], _run(tmp_path, "fail"))  # retries allowed: a diverged loss is not retried
    msg = str(info.value)
    assert isinstance(info.value, DensituneError)
    assert "\n" not in msg
    assert msg.startswith(f"training stopped at a trial that would fail again ({cfg.key}, not retried): ")
    assert cfg.key.startswith("cnn-D4-ce-s0-")
    assert "FloatingPointError" in msg and "training loss became nan at epoch 1" in msg


# ---------------------------------------------------------------------------- 2. config validation


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(train_limit=0), "train limit must be >= 1"),
        (dict(train_limit=-5), "train limit must be >= 1"),
        (dict(train_limit=2.5), "train_limit must be an integer or None"),
        (dict(weight_decay=-1e-4), "weight decay must be >= 0"),
        (dict(delta=0.0), "delta .* must be > 0"),
        (dict(delta=-1), "delta .* must be > 0"),
        (dict(epochs=2.0), "epochs must be an integer"),
        (dict(epochs=True), "epochs must be an integer"),
        (dict(batch_size="64"), "batch_size must be an integer"),
        (dict(feature_dim=8.5), "feature_dim must be an integer"),
        (dict(lr=math.nan), "lr must be a finite number"),
        (dict(lr="0.1"), "lr must be a finite number"),
        (dict(spectral="yes"), "spectral must be true or false"),
        (dict(backbone=None), "backbone must be a string"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**overrides)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "..", ".hidden", "-x", "exp=1", "a b", "ünïcode", "x\n", "a:b"])
def test_config_rejects_experiment_names_that_need_escaping(name):
    with pytest.raises(ConfigError, match="experiment name .* is not allowed: .*letters, digits"):
        TrainConfig(experiment=name)
    with pytest.raises(ConfigError, match="experiment name"):
        TrainRun(experiment=name, models_dir="m", results_dir="r", storage_path="t")


def test_config_accepts_and_normalises_good_values():
    for name in ("default", "run-1.2_b", "0", "A.b-C_d"):
        assert TrainConfig(experiment=name).experiment == name
    cfg = TrainConfig(epochs=np.int64(3), batch_size=np.int32(16), lr=np.float32(0.5), train_limit=np.int64(10),
                      spectral=np.bool_(False), weight_decay=0, delta=2)
    assert type(cfg.epochs) is int and type(cfg.batch_size) is int and type(cfg.train_limit) is int
    assert type(cfg.lr) is float and cfg.lr == 0.5 and type(cfg.weight_decay) is float
    assert cfg.spectral is False
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig(train_limit=None).train_limit is None


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def test_training_on_a_folder_needs_train_and_test(tmp_path):
    flat = tmp_path / "flat"
    for c in ("a", "b"):
        for i in range(4):
            _png(flat / c / f"{i}.png", 40 * i)
    cfg = TrainConfig(dataset=f"folder:{flat}", epochs=1)  # constructing is fine: a checkpoint may outlive its folder
    with pytest.raises(ConfigError, match=r"has no train/ or test/ subfolder; .*same images would be used for training, selection and test"):
        data_description(cfg)
    with pytest.raises(ConfigError, match="train/ and test/"):
        next(fit(cfg))
    only_train = tmp_path / "only-train"
    for c in ("a", "b"):
        _png(only_train / "train" / c / "0.png", 10)
    with pytest.raises(ConfigError, match="has no test/ subfolder"):
        data_description(TrainConfig(dataset="folder:only-train", data_root=str(tmp_path)))

    split = tmp_path / "split"
    for s in ("train", "test"):
        for c in ("a", "b"):
            for i in range(6):
                _png(split / s / c / f"{i}.png", 30 * i + (100 if c == "b" else 0))
    data = data_description(TrainConfig(dataset=f"folder:{split}"))
    assert data["num_classes"] == 2 and data["shape"] == [1, 8, 8]

    moved = TrainConfig(dataset=f"folder:{tmp_path / 'gone'}")  # a missing folder is a DataError, as before
    with pytest.raises(DensituneError, match="data not found"):
        data_description(moved)
    assert TrainConfig.from_dict(moved.to_dict()) == moved  # a checkpoint whose folder moved still loads


# ---------------------------------------------------------------------------- 3. --resume with another config


@pytest.fixture(scope="module")
def one_epoch_state():
    cfg = TrainConfig(**{**SMALL, "epochs": 2, "experiment": "r"})
    return cfg, next(fit(cfg, device=torch.device("cpu")))


def _save_state(run: TrainRun, cfg: TrainConfig, st) -> None:
    save_checkpoint(run.state_dir(cfg), config=cfg, model=st.model, loss=st.loss, data=st.data, epoch=st.epoch,
                    metrics=st.metrics, optimizer=st.optimizer, scheduler=st.scheduler)


def test_resume_only_from_state_of_the_same_config(tmp_path, one_epoch_state, caplog):
    cfg, st = one_epoch_state
    run = _run(tmp_path, "r", resume=True)
    assert saved_state(run, cfg) is None  # nothing saved yet
    _save_state(run, cfg, st)
    state = saved_state(run, cfg)
    assert state is not None and state["epoch"] == 1
    assert saved_state(_run(tmp_path, "r", resume=False), cfg) is None  # no --resume: never

    for changed in (dict(epochs=3), dict(lr=0.01), dict(train_limit=200)):
        other = TrainConfig(**{**cfg.to_dict(), **changed})
        assert other.key != cfg.key and other.name == cfg.name  # another network: its own folders
        assert saved_state(run, other) is None  # nothing saved under its key
        # A state copied (or moved by hand) into its folder is still not continued.
        shutil.copytree(run.state_dir(cfg), run.state_dir(other))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="densitune.trainables.train.tune"):
            assert saved_state(run, other) is None
        (rec,) = caplog.records
        assert f"differs in {next(iter(changed))}" in rec.getMessage() and "starting fresh" in rec.getMessage()

    (run.state_dir(cfg) / "model.pt").write_bytes(b"garbage")  # unreadable state: start fresh too
    with caplog.at_level(logging.WARNING, logger="densitune.trainables.train.tune"):
        assert saved_state(run, cfg) is None


@pytest.mark.ray
def test_resume_with_more_epochs_starts_fresh_in_ray(ray_session, tmp_path, one_epoch_state):
    short, st = one_epoch_state
    longer = TrainConfig(**{**short.to_dict(), "epochs": 3})
    run = _run(tmp_path, "r", resume=True)
    _save_state(run, short, st)  # a 2-epoch run stopped after epoch 1
    old_state = read_checkpoint(run.state_dir(short))
    assert run.state_dir(longer) != run.state_dir(short)  # the network key includes the config's hash

    (metrics,) = run_training([longer], run, max_failures=0)
    fresh = list(fit(longer, device=torch.device("cpu")))
    continued = list(fit(longer, device=torch.device("cpu"), resume=old_state))
    assert metrics["epoch"] == 3
    assert metrics["train_loss"] == pytest.approx(fresh[-1].train_loss, rel=1e-5)
    # the test tells the two apart: continuing the 2-epoch state would have given other numbers
    assert continued[-1].train_loss != pytest.approx(fresh[-1].train_loss, rel=1e-5)
    assert load_model(run.model_dir(longer)).config == longer
    assert read_checkpoint(run.state_dir(longer))["config"] == longer.to_dict()
    assert read_checkpoint(run.state_dir(short))["epoch"] == 1  # the shorter run's state: untouched


# ---------------------------------------------------------------------------- 4. the model store


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "not a densitune checkpoint config"),
        ('{"learning_rate": 0.1}', "not a densitune checkpoint config"),
        (json.dumps({"format": FORMAT, "version": 99, "config": {}}), "format version 99"),
        (json.dumps({"format": FORMAT, "version": VERSION, "epoch": 1}), "expected a dict of training settings, got NoneType"),
        (json.dumps({"format": FORMAT, "version": VERSION, "config": [1], "epoch": 1}), "expected a dict .* got list"),
        (json.dumps({**_meta(), "config": {**_meta()["config"], "colour": "red"}}), "unknown training config keys: colour"),
        (json.dumps({**_meta(), "config": {**_meta()["config"], "epochs": "ten"}}), "epochs must be an integer"),
        (json.dumps({**_meta(), "config": {**_meta()["config"], "backbone": "resnet9"}}), "unknown backbone"),
        (json.dumps({**_meta(), "epoch": "1"}), "epoch must be an integer"),
        ("{ not json", "corrupt checkpoint config"),
    ],
)
def test_discover_names_foreign_or_corrupt_config_json(tmp_path, content, match):
    f = tmp_path / "models" / "odd" / "config.json"
    f.parent.mkdir(parents=True)
    f.write_text(content)
    with pytest.raises(CheckpointError, match=match) as info:
        discover(tmp_path / "models")
    assert str(f) in str(info.value) and "\n" not in str(info.value)


def test_discover_non_utf8_config_json(tmp_path):
    f = tmp_path / "m" / "x" / "config.json"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt checkpoint config"):
        discover(tmp_path / "m")


def test_group_members_share_the_training_config(tmp_path):
    root = tmp_path / "models"
    _write_meta(root / "a" / "s0", _meta(seed=0, experiment="a"))
    _write_meta(root / "b" / "s1", _meta(seed=1, experiment="b"))  # seed and experiment may differ
    (group,) = discover(root)
    assert group.key == "cnn-D4-ce" and group.seeds == (0, 1)

    _write_meta(root / "a" / "s2", _meta(seed=2, lr=0.01, weight_decay=0.0))
    with pytest.raises(ConfigError, match=r"model group cnn-D4-ce mixes training configs: .*differ in lr, weight_decay"):
        discover(root)


def test_group_with_different_lr_from_real_checkpoints(tmp_path):
    root = tmp_path / "models"
    _untrained_checkpoint(root / "e" / "s0", TrainConfig(**SMALL, seed=0, experiment="e"))
    _untrained_checkpoint(root / "e" / "s1", TrainConfig(**{**SMALL, "seed": 1, "lr": 0.2, "epochs": 2, "experiment": "e"}))
    with pytest.raises(ConfigError, match="model group cnn-D4-ce .* differ in epochs, lr"):
        discover(root)


def test_check_checkpoints_reads_every_model_file(tmp_path):
    root = tmp_path / "models"
    d0 = _untrained_checkpoint(root / "e" / "s0", TrainConfig(**SMALL, seed=0, experiment="e"))
    d1 = _untrained_checkpoint(root / "e" / "s1", TrainConfig(**SMALL, seed=1, experiment="e"))
    groups = discover(root)
    check_checkpoints(groups)  # all fine

    f = d1 / "model.pt"
    good = f.read_bytes()
    f.write_bytes(good[:300])  # truncated
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint {f}"):
        check_checkpoints(groups)
    f.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {f}"):
        check_checkpoints(groups)
    f.write_bytes(good)
    check_checkpoints(groups)

    meta = read_config(d0)  # config.json edited after the fact: it no longer describes the weights
    meta["config"]["experiment"] = "renamed"
    (d0 / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"checkpoint {d0 / 'model.pt'} does not match its config.json .*differs in experiment"):
        check_checkpoints(discover(root))


def test_load_model_names_a_checkpoint_whose_config_no_longer_validates(tmp_path):
    d = _untrained_checkpoint(tmp_path / "m", TrainConfig(**SMALL))
    state = read_checkpoint(d)
    state["config"]["experiment"] = "a/b"
    torch.save(state, d / "model.pt")
    with pytest.raises(CheckpointError, match=f"bad checkpoint config in {d / 'model.pt'}: experiment name"):
        load_model(d)


# ---------------------------------------------------------------------------- 5. atomic writes


def test_temp_names_are_unique_and_nothing_is_left_behind(tmp_path):
    p = tmp_path / "model.pt"
    a, b = temp_path(p), temp_path(p)
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".tmp-") and a.name.endswith("-model.pt")

    cfg = TrainConfig(**SMALL)
    _untrained_checkpoint(tmp_path / "c", cfg)
    with pytest.raises(Exception):  # a failed write removes its temporary file and keeps the old file
        save_checkpoint(tmp_path / "c", config=cfg, model=torch.nn.Linear(2, 2), loss=torch.nn.Identity(),
                        data={"shape": lambda: 0}, epoch=1, metrics={})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.pt"]
    assert load_model(tmp_path / "c").config == cfg


def test_concurrent_checkpoint_writes_leave_a_loadable_checkpoint(tmp_path):
    cfgs = [TrainConfig(**SMALL, seed=s) for s in (0, 1)]
    data = data_description(cfgs[0])
    parts = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        parts.append((cfg, build_model(cfg, data), create_loss("ce", num_classes=10, feature_dim=4)))
    target = tmp_path / "shared"
    errors = []
    barrier = threading.Barrier(len(parts))

    def write(cfg, model, loss):
        try:
            barrier.wait()
            for epoch in range(1, 6):
                save_checkpoint(target, config=cfg, model=model, loss=loss, data=data, epoch=epoch, metrics={})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=p) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.pt"]  # no .tmp-* left
    loaded = load_model(target)
    assert loaded.config in cfgs
    model = dict(parts[cfgs.index(loaded.config)][1].state_dict())
    assert all(torch.equal(model[k], v) for k, v in loaded.model.state_dict().items())  # one writer's file, whole
    assert read_config(target)["epoch"] == 5
