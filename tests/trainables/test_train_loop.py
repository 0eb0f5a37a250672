"""The training loop: it learns, it is deterministic, and resuming equals not stopping."""

from __future__ import annotations

import torch

from densitune.trainables.train.checkpoint import read_checkpoint, save_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_learns_digits():
    states = list(fit(TrainConfig(backbone="cnn", feature_dim=8, epochs=3)))
    assert [s.epoch for s in states] == [1, 2, 3]
    assert states[-1].val_accuracy > 0.85  # 10 classes: chance is 0.1
    assert states[-1].train_loss < states[0].train_loss


def test_same_seed_same_numbers_and_resume_matches(tmp_path):
    cfg = TrainConfig(backbone="cnn", feature_dim=8, epochs=2, loss="contrastive")
    full = list(fit(cfg))
    again = list(fit(cfg))
    assert full[-1].train_loss == again[-1].train_loss
    w_full = _weights(full[-1].model)
    assert all(torch.equal(w_full[k], v) for k, v in _weights(again[-1].model).items())

    first = next(fit(cfg))  # stop after epoch 1, checkpoint, resume
    save_checkpoint(tmp_path, config=cfg, model=first.model, loss=first.loss, data=first.data, epoch=1,
                    metrics=first.metrics, optimizer=first.optimizer, scheduler=first.scheduler)
    (resumed,) = list(fit(cfg, resume=read_checkpoint(tmp_path)))
    assert resumed.epoch == 2
    assert resumed.train_loss == full[-1].train_loss
    assert all(torch.equal(w_full[k], v) for k, v in _weights(resumed.model).items())
