"""A malicious pickle planted in place of any cached or saved artefact is rejected, never executed.

The plant is a real exploit: unpickling it calls ``open(marker, "w")`` (a test first proves that an
unrestricted ``torch.load`` does create the marker). Every artefact densitune reads back is
tried: the disk cache's features, fitted densities and attacked sets, a trained model's
``model.pt`` (directly and through the CLI) and the per-epoch training state used by ``--resume``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densitune.errors import CheckpointError
from densitune.search.evaluate import Workspace
from densitune.search.models import discover, select
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.trainables.train.checkpoint import load_model, read_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.tune import TrainRun, saved_state


class _Exploit:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, form: str) -> None:
    if form == "torch.save":
        torch.save({"model": _Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Exploit(marker)))


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_the_plant_is_live(tmp_path, form):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "x.pt", marker, form)
    with contextlib.suppress(Exception):  # a bare pickle then fails torch's magic-number check: too late
        torch.load(tmp_path / "x.pt", weights_only=False)  # what densitune must never do
    assert marker.exists()


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_planted_cache_files_are_rejected_and_recomputed(trained_models, tmp_path, caplog, form):
    (group,) = select(discover(trained_models), (4,))
    spec = SearchSpec(experiment="m", val_ood="digits-blend", test_ood=("noise-uniform",), attacks=("fgsm",),
                      attack_eps=0.1, eval_limit=60)
    params = TrialParams(group.key, "density", "gmm_sum", eps=0.0)
    cache = tmp_path / "cache"
    _, rows = run_trial(Workspace(torch.device("cpu"), cache_dir=cache), spec, group, params, "a")
    planted = {kind: sorted((cache / kind).glob("*.pt")) for kind in ("extract", "fit", "attack")}
    assert all(planted.values())  # features, a fitted density and an attacked set were cached
    marker = tmp_path / "pwned"
    for files in planted.values():
        for f in files:
            _plant(f, marker, form)
    with caplog.at_level(logging.WARNING, logger="densitune.search.cache"):
        _, again = run_trial(Workspace(torch.device("cpu"), cache_dir=cache), spec, group, params, "b")
    assert not marker.exists()
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == sum(len(v) for v in planted.values())  # one warning per planted file
    assert all("\n" not in m and "recomputing" in m for m in rejected)
    key = lambda r: (r["ood_dataset"], r["split"])  # noqa: E731
    assert [(key(r), r["auroc"]) for r in sorted(again, key=key)] == [(key(r), r["auroc"]) for r in sorted(rows, key=key)]
    for files in planted.values():  # the planted files were replaced by plain tensors
        for f in files:
            torch.load(f, weights_only=True)


@pytest.mark.process
@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_planted_model_checkpoint_is_a_one_line_error(trained_models, tmp_path, form):
    src = next(p.parent for p in trained_models.rglob("model.pt"))
    models = tmp_path / "models" / "t" / src.name
    shutil.copytree(src, models)
    marker = tmp_path / "pwned"
    _plant(models / "model.pt", marker, form)
    # refused (a pickle that asks for code) or, for a legacy raw pickle, not a checkpoint at all
    with pytest.raises(CheckpointError, match=f"(refused|corrupt) checkpoint {models / 'model.pt'}") as e:
        load_model(models)
    assert "\n" not in str(e.value)
    out = subprocess.run([sys.executable, "-m", "densitune", "search", "--out", str(tmp_path / "run"),
                          "--models", str(tmp_path / "models")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(("densitune: error: refused checkpoint", "densitune: error: corrupt checkpoint"))
    assert out.stderr.count("\n") == 1 and "weights_only=False" not in out.stderr
    assert not marker.exists() and not (tmp_path / "run" / "results").exists()


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_planted_training_state_is_not_resumed(trained_models, tmp_path, caplog, form):
    src = next(p.parent for p in trained_models.rglob("model.pt"))
    cfg = TrainConfig.from_dict(read_checkpoint(src)["config"])
    run = TrainRun(experiment=cfg.experiment, models_dir=str(tmp_path / "models"), results_dir=str(tmp_path / "results"),
                   storage_path=str(tmp_path / "tune"), resume=True)
    run.state_dir(cfg).mkdir(parents=True)
    marker = tmp_path / "pwned"
    _plant(run.state_dir(cfg) / "model.pt", marker, form)
    with caplog.at_level(logging.WARNING):
        assert saved_state(run, cfg) is None  # starts fresh
    assert not marker.exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ("not resuming, starting fresh: refused checkpoint" in warning
            or "not resuming, starting fresh: corrupt checkpoint" in warning) and "\n" not in warning
