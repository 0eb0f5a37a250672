"""Evaluating one search trial: fit, score, measure; selection and test kept apart.

:class:`Workspace` is a per-process cache (Ray reuses trial actors, so one process
serves many trials): each (checkpoint, data set, split) is loaded and its clean
features extracted once; each (checkpoint, density, parameters) is fitted once; each
(checkpoint, attack) is run once. A trial that varies only ε pays for its perturbed
passes and nothing else.

Scientific honesty is structural here: :func:`selection_metrics` is the only input to
the search objective and it is only given validation data; :func:`test_metrics` runs
after the objective is fixed and its numbers are recorded, never returned to the
sampler.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from densitune.device import default_device
from densitune.errors import ConfigError
from densitune.search.cache import DiskCache, checkpoint_token
from densitune.search.ood.densities import Density, create_density, density_from_state
from densitune.search.ood.metrics import ood_metrics
from densitune.search.ood.scores import Score, create_score, score_class
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.trainables.data import load_split
from densitune.trainables.train.checkpoint import LoadedModel, load_model

log = logging.getLogger(__name__)

__all__ = ["TrialParams", "Workspace", "workspace", "selection_metrics", "test_metrics"]


@dataclass
class Features:
    """Clean features of one data split under one model: z (N, D), logits (N, K), y (N,)."""

    z: Tensor
    logits: Tensor
    y: Tensor


class Workspace:
    """Per-process caches of models, data, clean features, fitted densities and attacks.

    With ``cache_dir``, features, densities and attacked inputs also go through a
    :class:`~densitune.search.cache.DiskCache` shared by every process (Ray actors, nodes on
    shared storage), so each is computed once per search, not once per process.
    ``counts`` records what this process computed ("load_model", "load_data",
    "extract", "fit", "attack").
    """

    def __init__(self, device: torch.device | None = None, cache_dir: str | Path | None = None) -> None:
        self.device = device or default_device()
        self.disk = DiskCache(cache_dir) if cache_dir else None
        self.counts: Counter[str] = Counter()
        self._models: dict[str, LoadedModel] = {}
        self._memo: dict[tuple, Any] = {}

    def _cached(
        self,
        kind: str,
        key: tuple,
        make: Callable[[], Any],
        disk_key: str | None = None,
        codec: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None,
    ) -> Any:
        """Memoise ``make()`` in memory, and on disk (through ``codec = (encode, decode)``) when a
        disk key is given and a cache is set."""
        mem_key = (kind, *key)
        if mem_key not in self._memo:

            def compute() -> Any:
                self.counts[kind] += 1
                return make()

            if self.disk is not None and disk_key is not None:
                # features and attacks live on the CPU; densities on the scoring device
                where = self.device if kind == "fit" else "cpu"
                encode, decode = codec or (lambda obj: obj, lambda state: state)
                self._memo[mem_key] = self.disk.get_or_create(kind, disk_key, compute, map_location=where,
                                                              encode=encode, decode=decode)
            else:
                self._memo[mem_key] = compute()
        return self._memo[mem_key]

    def model(self, checkpoint: str) -> LoadedModel:
        if checkpoint not in self._models:
            self.counts["load_model"] += 1
            self._models[checkpoint] = load_model(checkpoint, device=self.device)
        return self._models[checkpoint]

    def data(self, key: tuple, make: Callable[[], Dataset]) -> Dataset:
        """The data set cached under ``key`` (in memory: loading is cheap), made by ``make()`` once."""
        return self._cached("load_data", key, make)

    def loaded_data(self) -> list[tuple]:
        """Keys (name, split, shape, root, seed, limit) of every data set this workspace loaded."""
        return [k[1:] for k in self._memo if k[0] == "load_data"]

    def attacked(self, checkpoint: str, key: tuple, make: Callable[[], tuple[Tensor, Tensor]]) -> Dataset:
        """Attacked inputs (x_adv, y) of one model, cached on disk."""
        codec = (lambda xy: {"x": xy[0], "y": xy[1]}, lambda s: (s["x"], s["y"]))
        x, y = self._cached("attack", (checkpoint, *key), make, f"{checkpoint_token(checkpoint)}|{key!r}", codec)
        return TensorDataset(x, y)

    def features(self, checkpoint: str, data_key: tuple, data: Dataset, batch_size: int = 512) -> Features:
        @torch.no_grad()
        def extract() -> Features:
            model = self.model(checkpoint).model
            zs, ls, ys = [], [], []
            for x, y in DataLoader(data, batch_size=batch_size):
                z, logits = model.features_and_logits(x.to(self.device))
                zs.append(z.float().cpu())
                ls.append(logits.float().cpu())
                ys.append(y)
            return Features(torch.cat(zs), torch.cat(ls), torch.cat(ys))

        codec = (lambda f: {"z": f.z, "logits": f.logits, "y": f.y}, lambda s: Features(s["z"], s["logits"], s["y"]))
        return self._cached("extract", (checkpoint, *data_key), extract, f"{checkpoint_token(checkpoint)}|{data_key!r}",
                            codec)

    def density(self, checkpoint: str, name: str, params: str, train: Features, train_key: tuple = ()) -> Density:
        """``name`` fitted on the clean training features of ``checkpoint`` (``train_key`` names that split)."""

        def fit() -> Density:
            d = create_density(name, **json.loads(params))
            if d.needs_head:  # vim: the model's last layer (model.head, an nn.Linear)
                head = self.model(checkpoint).model.head
                d.set_head(head.weight, head.bias)
            return d.fit(train.z.to(self.device), train.y.to(self.device))

        disk_key = f"{checkpoint_token(checkpoint)}|{train_key!r}|{name}|{params}"
        codec = (lambda d: d.state_dict(), lambda s: density_from_state(s, self.device))
        return self._cached("fit", (checkpoint, name, params, *train_key), fit, disk_key, codec)


#: One process-wide workspace, shared by the trials a reused Ray actor runs.
_WORKSPACE: Workspace | None = None


def workspace(cache_dir: str | Path | None = None) -> Workspace:
    """The process-wide workspace (created on first use with ``cache_dir``)."""
    global _WORKSPACE
    if _WORKSPACE is None or (cache_dir and _WORKSPACE.disk is None):
        _WORKSPACE = Workspace(cache_dir=cache_dir)
    return _WORKSPACE


class _Evaluator:
    """Scores data for one trial on one model (or, for ensembles, on every seed of a group)."""

    def __init__(self, ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams) -> None:
        self.ws, self.spec, self.checkpoints, self.params = ws, spec, list(checkpoints), params
        first = ws.model(self.checkpoints[0])
        # Data sets come from the search's data root, else the one the network was trained from.
        self.data_root = spec.data_root or first.config.data_root
        self.shape = tuple(first.data["shape"])
        self.id_name = first.data["name"]
        self.data_seed = int(first.data.get("data_seed", 0))
        density = None
        if score_class(params.score).uses_density:
            (ckpt,) = self.checkpoints
            train_key, train_data = self.split(self.id_name, "train", limit=None)
            train = self.features(train_key, train_data)
            density = ws.density(ckpt, params.density, params.density_params, train[0], train_key)
        self.score: Score = create_score(params.score, [ws.model(c).model for c in self.checkpoints], density)
        self.density_fit = json.dumps(density.fitted_summary(), sort_keys=True) if density is not None else None

    def split(self, name: str, split: str, limit: int | None = -1) -> tuple[tuple, Dataset]:
        limit = self.spec.eval_limit if limit == -1 else limit
        key = (name, split, self.shape, self.data_root, self.data_seed, limit)
        make = lambda: load_split(name, split, root=self.data_root, seed=self.data_seed, shape=self.shape, limit=limit)  # noqa: E731
        return key, self.ws.data(key, make)

    def adversarial(self, attack: str, split: str = "test", eps: float | None = None) -> tuple[tuple, Dataset]:
        """An ID split attacked (L∞, budget ``eps``, default the spec's) against this trial's single model."""
        from densitune.search.ood.attacks import AttackConfig, attack_dataset

        (ckpt,) = self.checkpoints
        id_key, id_data = self.split(self.id_name, split)
        cfg = AttackConfig(eps=self.spec.attack_eps if eps is None else eps, steps=self.spec.attack_steps)
        key = ("adv", attack, cfg, *id_key)

        def make() -> tuple[Tensor, Tensor]:
            model = self.ws.model(ckpt).model
            return attack_dataset(attack, model, id_data, cfg, batch_size=self.spec.batch_size, device=self.ws.device)

        return key, self.ws.attacked(ckpt, key, make)

    def features(self, key: tuple, data: Dataset) -> list[Features]:
        return [self.ws.features(c, key, data, self.spec.batch_size) for c in self.checkpoints]

    def scores(self, key: tuple, data: Dataset) -> tuple[Tensor, list[Features]]:
        """(N,) float64 scores of a data set with this trial's ε, and its clean features per model."""
        feats = self.features(key, data)
        eps = self.params.eps
        if eps == 0:
            dev = self.ws.device
            fast = self.score.from_features([(f.z.to(dev), f.logits.to(dev)) for f in feats])
            if fast is not None:
                return fast.detach().double().cpu(), feats
        out = [
            self.score.evaluate(x.to(self.ws.device), eps).double().cpu()
            for x, _ in DataLoader(data, batch_size=self.spec.batch_size)
        ]
        return torch.cat(out), feats

    def compare(self, id_split: tuple[tuple, Dataset], ood_split: tuple[tuple, Dataset]) -> dict[str, Any]:
        s_id, f_id = self.scores(*id_split)
        s_ood, _ = self.scores(*ood_split)
        m: dict[str, Any] = ood_metrics(s_id, s_ood)
        probs = torch.stack([f.logits.double().softmax(1) for f in f_id]).mean(0)
        m.update(n_id=len(s_id), n_ood=len(s_ood), id_accuracy=float((probs.argmax(1) == f_id[0].y).double().mean()),
                 density_fit=self.density_fit)
        return m


def selection_metrics(ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams) -> dict[str, Any]:
    """Validation metrics, the ONLY input to the objective; never any test data.

    Returns the metrics of the validation row plus ``objective`` (what the sampler sees)
    and ``ood_dataset`` (the validation OOD side, per ``spec.protocol``).
    """
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_val = ev.split(ev.id_name, "val")
    if spec.protocol == "id-only":
        s_id, feats = ev.scores(*id_val)
        acc = float((feats[0].logits.argmax(1) == feats[0].y).double().mean())
        return {"objective": float(s_id.mean()), "ood_dataset": None, "n_id": len(s_id), "id_accuracy": acc,
                "density_fit": ev.density_fit}
    if spec.protocol == "adv-proxy":
        if ev.score.ensemble:
            raise ConfigError("protocol adv-proxy attacks one model: it cannot select ensemble scores")
        m = ev.compare(id_val, ev.adversarial(spec.proxy_attack, "val", spec.proxy_eps))
        ood = f"proxy-{spec.proxy_attack}"
    else:
        ood = cast(str, spec.val_ood)  # protocol val-ood: SearchSpec requires val_ood
        m = ev.compare(id_val, ev.split(ood, "val"))
    return {**m, "objective": m[spec.metric], "ood_dataset": ood}


def _test_sets(ev: _Evaluator, spec: SearchSpec) -> list[tuple[str, tuple[tuple, Dataset]]]:
    """(name, split) of every test OOD set, and of every attack (``adv-<attack>``) for single-model scores."""
    sets = [(ood, ev.split(ood, "test")) for ood in spec.test_ood]
    if not ev.score.ensemble:  # an ensemble has no one model to attack
        sets += [(f"adv-{attack}", ev.adversarial(attack)) for attack in spec.attacks]
    return sets


def test_metrics(ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams) -> dict[str, dict[str, Any]]:
    """Test metrics (ID test vs each test OOD set, and vs each attack): recorded, never used to select."""
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_test = ev.split(ev.id_name, "test")
    return {name: ev.compare(id_test, split) for name, split in _test_sets(ev, spec)}


def test_score_arrays(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams
) -> dict[str, Tensor]:
    """Raw (N,) float64 scores of the ID test split (key ``"id"``) and of every test OOD set and
    attack (keyed by its ``ood_dataset`` name), for plots. Higher = more in-distribution."""
    ev = _Evaluator(ws, spec, checkpoints, params)
    out = {"id": ev.scores(*ev.split(ev.id_name, "test"))[0]}
    out.update({name: ev.scores(*split)[0] for name, split in _test_sets(ev, spec)})
    return out
