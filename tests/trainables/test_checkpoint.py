"""Checkpoints: save -> load gives identical outputs; corrupt or foreign files fail clearly."""

from __future__ import annotations

import pytest
import torch

from densitune.errors import CheckpointError, ConfigError, UnknownNameError
from densitune.trainables.data import load_split
from densitune.trainables.train.checkpoint import load_model, read_checkpoint, read_config, save_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit


@pytest.fixture(scope="module")
def one_epoch():
    cfg = TrainConfig(backbone="cnn", feature_dim=6, epochs=1, loss="contrastive")
    (state,) = list(fit(cfg))
    return cfg, state


def test_save_load_identical_outputs(tmp_path, one_epoch):
    cfg, st = one_epoch
    save_checkpoint(tmp_path, config=cfg, model=st.model, loss=st.loss, data=st.data, epoch=1, metrics=st.metrics)
    loaded = load_model(tmp_path)
    x = torch.stack([load_split("digits", "test")[i][0] for i in range(16)])
    st.model.eval()
    with torch.no_grad():
        z0, l0 = st.model.features_and_logits(x)
        z1, l1 = loaded.model.features_and_logits(x)
    assert torch.equal(z0, z1) and torch.equal(l0, l1)
    assert loaded.config == cfg
    assert torch.equal(loaded.centers, st.loss.centers.detach())  # the centers travel with the weights
    assert read_config(tmp_path)["config"] == cfg.to_dict()


def test_corrupt_and_missing(tmp_path, one_epoch):
    cfg, st = one_epoch
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path, config=cfg, model=st.model, loss=st.loss, data=st.data, epoch=1, metrics=st.metrics)
    f = tmp_path / "model.pt"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(tmp_path)
    torch.save({"weights": torch.zeros(2)}, f)
    with pytest.raises(CheckpointError, match="not a densitune checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint config"):
        read_config(tmp_path)


def test_config_validation():
    with pytest.raises(ConfigError, match="D must be > 0"):
        TrainConfig(feature_dim=0)
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet9'"):
        TrainConfig(backbone="resnet9")
    with pytest.raises(UnknownNameError, match="unknown loss"):
        TrainConfig(loss="hinge")
    with pytest.raises(ConfigError, match="unknown training config keys: colour"):
        TrainConfig.from_dict({"colour": "red"})
