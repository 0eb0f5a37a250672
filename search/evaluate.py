"""Evaluating one search trial: fit, score, measure; selection and test kept apart.

:class:`Workspace` is a per-process cache (Ray reuses trial actors, so one process
serves many trials): each (checkpoint, data set, split) is loaded and its clean
features extracted once; each (checkpoint, density, parameters) is fitted once. A
trial that varies only ε pays for its perturbed passes and nothing else.

Scientific honesty is structural here: :func:`selection_metrics` is the only input to
the search objective and it is only given validation data; :func:`test_metrics` runs
after the objective is fixed and its numbers are recorded, never returned to the
sampler.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from search.densities import Density, create_density
from search.metrics import ood_metrics
from search.perturb import perturb
from search.scores import Score, create_score
from search.spec import SearchSpec
from trainables.checkpoint import LoadedModel, load_model
from trainables.data import load_split
from trainables.train import default_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space."""

    group: str  # ModelGroup.key
    density: str
    score: str
    eps: float


@dataclass
class Features:
    """Clean features of one data split under one model: z (N, D), logits (N, K), y (N,)."""

    z: Tensor
    logits: Tensor
    y: Tensor


class Workspace:
    """Per-process caches of models, data, clean features and fitted densities.

    ``counts`` records the expensive events ("load_model", "extract", "fit") so tests
    and logs can show that caching works.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or default_device()
        self.counts: Counter[str] = Counter()
        self._models: dict[str, LoadedModel] = {}
        self._data: dict[tuple, Dataset] = {}
        self._features: dict[tuple, Features] = {}
        self._densities: dict[tuple, Density] = {}

    def model(self, checkpoint: str) -> LoadedModel:
        if checkpoint not in self._models:
            self.counts["load_model"] += 1
            self._models[checkpoint] = load_model(checkpoint, device=self.device)
        return self._models[checkpoint]

    def data(self, name: str, split: str, *, shape: tuple[int, ...], root: str | None, seed: int, limit: int | None) -> Dataset:
        key = (name, split, tuple(shape), root, seed, limit)
        if key not in self._data:
            self.counts["load_data"] += 1
            self._data[key] = load_split(name, split, root=root, seed=seed, shape=tuple(shape), limit=limit)
        return self._data[key]

    @torch.no_grad()
    def features(self, checkpoint: str, data_key: tuple, data: Dataset, batch_size: int = 512) -> Features:
        key = (checkpoint, *data_key)
        if key not in self._features:
            self.counts["extract"] += 1
            model = self.model(checkpoint).model
            zs, ls, ys = [], [], []
            for x, y in DataLoader(data, batch_size=batch_size):
                z, logits = model.features_and_logits(x.to(self.device))
                zs.append(z.float().cpu())
                ls.append(logits.float().cpu())
                ys.append(y)
            self._features[key] = Features(torch.cat(zs), torch.cat(ls), torch.cat(ys))
        return self._features[key]

    def density(self, checkpoint: str, name: str, params: dict[str, Any], train: Features) -> Density:
        key = (checkpoint, name, json.dumps(params, sort_keys=True))
        if key not in self._densities:
            self.counts["fit"] += 1
            d = create_density(name, **params).fit(train.z.to(self.device), train.y.to(self.device))
            self._densities[key] = d
        return self._densities[key]


#: One process-wide workspace, shared by the trials a reused Ray actor runs.
_WORKSPACE: Workspace | None = None


def workspace() -> Workspace:
    global _WORKSPACE
    if _WORKSPACE is None:
        _WORKSPACE = Workspace()
    return _WORKSPACE


class _Evaluator:
    """Scores data sets for one (checkpoint, trial) pair."""

    def __init__(self, ws: Workspace, spec: SearchSpec, checkpoint: str, params: TrialParams) -> None:
        self.ws, self.spec, self.checkpoint, self.params = ws, spec, checkpoint, params
        self.loaded = ws.model(checkpoint)
        self.shape = tuple(self.loaded.data["shape"])
        self.id_name = self.loaded.data["name"]
        self.data_seed = int(self.loaded.data.get("data_seed", 0))
        train_key, train = self._split(self.id_name, "train", limit=None)
        density = None
        if self.params.score in _DENSITY_SCORES():
            feats = ws.features(checkpoint, train_key, train, spec.batch_size)
            density = ws.density(checkpoint, params.density, spec.density_params.get(params.density, {}), feats)
        self.score: Score = create_score(params.score, self.loaded.model, density)

    def _split(self, name: str, split: str, limit: int | None) -> tuple[tuple, Dataset]:
        key = (name, split, self.shape, self.spec.data_root, self.data_seed, limit)
        return key, self.ws.data(name, split, shape=self.shape, root=self.spec.data_root, seed=self.data_seed, limit=limit)

    def scores(self, name: str, split: str) -> tuple[Tensor, Features]:
        """(N,) float64 scores of a data split with this trial's ε, and its clean features."""
        key, data = self._split(name, split, self.spec.eval_limit)
        feats = self.ws.features(self.checkpoint, key, data, self.spec.batch_size)
        eps = self.params.eps
        if eps == 0:
            fast = self.score.from_features(feats.z.to(self.ws.device), feats.logits.to(self.ws.device))
            if fast is not None:
                return fast.detach().double().cpu(), feats
        out = []
        for x, _ in DataLoader(data, batch_size=self.spec.batch_size):
            x = perturb(x.to(self.ws.device), self.score.perturbation_score, eps)
            with torch.no_grad():
                out.append(self.score(x).double().cpu())
        return torch.cat(out), feats

    def compare(self, ood: str, split: str) -> dict[str, Any]:
        s_id, f_id = self.scores(self.id_name, split)
        s_ood, _ = self.scores(ood, split)
        m = ood_metrics(s_id, s_ood)
        m.update(n_id=len(s_id), n_ood=len(s_ood))
        m["id_accuracy"] = float((f_id.logits.argmax(1) == f_id.y).float().mean())
        return m


def _DENSITY_SCORES() -> set[str]:
    from search.scores import SCORES

    return {n for n in SCORES.names() if SCORES.get(n).uses_density}


def selection_metrics(ws: Workspace, spec: SearchSpec, checkpoint: str, params: TrialParams) -> dict[str, Any]:
    """Validation metrics (ID val vs the validation OOD set): the ONLY input to the objective."""
    return _Evaluator(ws, spec, checkpoint, params).compare(spec.val_ood, "val")


def test_metrics(ws: Workspace, spec: SearchSpec, checkpoint: str, params: TrialParams) -> dict[str, dict[str, Any]]:
    """Test metrics (ID test vs each test OOD set): recorded, never used to select."""
    ev = _Evaluator(ws, spec, checkpoint, params)
    return {ood: ev.compare(ood, "test") for ood in spec.test_ood}
