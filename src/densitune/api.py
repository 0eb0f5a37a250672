"""densitune as a library: fit a feature-density OOD detector on any network, or take one out of a run.

Bring your own network: any ``nn.Module`` that follows :class:`FeatureModel` (the protocol the search
scores with) works with :func:`fit_detector`::

    model(x)                       -> (N, K) logits
    model.features(x)              -> (N, D) features z: the input of the final linear layer
    model.features_and_logits(x)   -> ((N, D) z, (N, K) logits) from one forward pass

with x an (N, C, H, W) float batch in [0, 1] (normalisation inside the model, so ε is in pixel units).
:class:`TorchvisionFeatures` adds that protocol, and a D-dimensional projection before the classifier,
to a torchvision classifier whose weights file you have locally.

Scores: higher = more in-distribution, always.

    detector = densitune.fit_detector(model, train_loader, density="gmm_sum", eps=0.002)
    s = detector.score(x)                     # (N,) float64 tensor

A run's configuration leaves the run with ``densitune export RUN/results OUT --where ...``
(:func:`export_detector`) and comes back with :func:`load_detector` (no pickle: every file loads
with ``torch.load(..., weights_only=True)`` or is JSON).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from densitune.errors import ConfigError, DensituneError
from densitune.run.files import DocumentError, read_document
from densitune.run.runstore import location
from densitune.search.ood.densities import Density, create_density, density_from_state
from densitune.search.ood.scores import FeatureModel, create_score, score_class

__all__ = ["Detector", "FeatureModel", "TorchvisionFeatures", "export_detector", "fit_detector", "load_detector"]

FORMAT = "densitune-detector"
VERSION = 1
MANIFEST = "detector.json"


def _as_images(x: Any) -> Tensor:
    """(N, C, H, W) float32 tensor from a tensor or numpy array."""
    import numpy as np

    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, Tensor) or t.ndim != 4:
        raise DensituneError(f"inputs must be an (N, C, H, W) tensor or array, got {getattr(t, 'shape', type(t).__name__)}")
    return t.float()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Detector:
    """An OOD detector: a score over one network (or the networks of an ensemble), a fitted density, ε.

    Args:
        models: networks following :class:`FeatureModel` (several only for ensemble scores).
        score: a registered score (``densitune list``), default ``density`` (log q(f(x))).
        density: the fitted density for scores that use one.
        eps: default input-perturbation budget ε (pixel units of inputs in [0, 1]).
        batch_size: inputs scored at once.
        info: free metadata (an exported detector records where it came from).
    """

    def __init__(self, models: Sequence[nn.Module], score: str = "density", density: Density | None = None,
                 eps: float = 0.0, batch_size: int = 512, info: dict[str, Any] | None = None) -> None:
        self.models = list(models)
        for m in self.models:
            if not isinstance(m, FeatureModel):
                raise ConfigError(f"{type(m).__name__} does not follow densitune.FeatureModel "
                                  "(features, features_and_logits, __call__)")
            m.eval()
        self.score_name, self.density, self.eps, self.batch_size = score, density, float(eps), batch_size
        self.info = dict(info or {})
        self._score = create_score(score, self.models, density)  # type: ignore[arg-type]

    def score(self, x: Tensor | Any, eps: float | None = None) -> Tensor:
        """(N,) float64 scores of inputs x (N, C, H, W) in [0, 1] (tensor or numpy), higher = more ID.

        ``eps`` (default: the detector's) perturbs each input along the gradient sign of the score first.
        """
        x = _as_images(x)
        eps = self.eps if eps is None else float(eps)
        dev = _device(self.models[0])
        return torch.cat([self._score.evaluate(b.to(dev), eps).double().cpu() for b in x.split(self.batch_size)])

    def __repr__(self) -> str:
        d = f", density={self.density.name}" if self.density is not None else ""
        return f"Detector(score={self.score_name}{d}, eps={self.eps:g}, models={len(self.models)})"


@torch.no_grad()
def _train_features(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[Tensor, Tensor]:
    zs, ys = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        z, _ = model.features_and_logits(_as_images(x).to(device))  # type: ignore[operator]
        zs.append(z.float())
        ys.append(torch.as_tensor(y).to(device))
    if not zs:
        raise DensituneError("the training loader yielded no batches")
    return torch.cat(zs), torch.cat(ys)


def fit_detector(model: nn.Module, train_loader: Iterable, density: str = "gmm_sum", *, score: str = "density",
                 eps: float = 0.0, density_params: dict[str, Any] | None = None) -> Detector:
    """Fit ``density`` on the clean features of the training data and return a :class:`Detector`.

    Args:
        model: an ``nn.Module`` following :class:`FeatureModel`, already trained.
        train_loader: yields (x (B, C, H, W) in [0, 1], y (B,) int labels) batches of the in-distribution
            training data (no augmentation), e.g. a ``torch.utils.data.DataLoader``.
        density: ``gmm_sum`` (DDU), ``gmm_max`` or ``kde``; ``density_params`` its parameters.
        score: the score (default ``density``; ``diff`` also uses the density).
        eps: the detector's default input-perturbation budget.
    """
    if not isinstance(model, FeatureModel):
        raise ConfigError(f"{type(model).__name__} does not follow densitune.FeatureModel")
    model.eval()
    fitted = None
    if score_class(score).uses_density:
        z, y = _train_features(model, train_loader, _device(model))
        fitted = create_density(density, **(density_params or {})).fit(z, y)
    return Detector([model], score, fitted, eps)


class TorchvisionFeatures(nn.Module):
    """A torchvision classifier with a D-dimensional feature projection, following :class:`FeatureModel`.

    The network's own stem and body are kept (meant for inputs of 64 px and up); its final linear layer
    is replaced by ``Linear(width, D)`` (the features z the density models) and a ``Linear(D, K)`` head.
    Inputs are (N, 3, H, W) in [0, 1]; ``mean`` / ``std`` normalise inside the module. Train or fine-tune it
    as usual (``model(x)`` returns logits), then :func:`fit_detector`.

    Args:
        body: a torchvision classification model (ResNet ``fc``, or ``classifier`` ending in a Linear).
        feature_dim: D.
        num_classes: K.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        if feature_dim <= 0 or num_classes <= 0:
            raise ConfigError(f"feature_dim and num_classes must be > 0, got {feature_dim}, {num_classes}")
        width = self._strip_head(body)
        self.body = body
        self.project = nn.Linear(width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @staticmethod
    def _strip_head(body: nn.Module) -> int:
        """Replace the final Linear by Identity; its input width."""
        fc = getattr(body, "fc", None)
        if isinstance(fc, nn.Linear):
            body.fc = nn.Identity()
            return int(fc.in_features)
        classifier = getattr(body, "classifier", None)
        if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
            width = classifier[-1].in_features
            classifier[-1] = nn.Identity()
            return int(width)
        if isinstance(classifier, nn.Linear):
            width = classifier.in_features
            body.classifier = nn.Identity()
            return int(width)
        raise ConfigError(f"{type(body).__name__}: no final Linear found (expected .fc or .classifier)")

    @classmethod
    def from_file(cls, arch: str, weights: str | Path, feature_dim: int, num_classes: int, **kw: Any) -> TorchvisionFeatures:
        """``torchvision.models.<arch>`` with the state dict in the local file ``weights`` (loaded with
        ``weights_only=True``; nothing is downloaded), wrapped with a D projection."""
        import torchvision

        if not hasattr(torchvision.models, arch):
            raise ConfigError(f"unknown torchvision model {arch!r}")
        path = Path(weights)
        if not path.is_file():
            raise DensituneError(f"weights file not found: {path}")
        body = getattr(torchvision.models, arch)(weights=None)
        try:
            body.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError) as e:
            raise DensituneError(f"{path} is not a {arch} state dict: {str(e).splitlines()[0]}") from None
        return cls(body, feature_dim, num_classes, **kw)

    def features(self, x: Tensor) -> Tensor:
        """x (N, 3, H, W) in [0, 1] -> (N, D) features."""
        mean, std = cast(Tensor, self.mean), cast(Tensor, self.std)
        return self.project(self.body((x - mean) / std))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3, H, W) -> ((N, D) features, (N, K) logits)."""
        z = self.features(x)
        return z, self.head(z)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 3, H, W) -> (N, K) logits."""
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- export / load


def _trial_rows(results_dir: str | Path, where: str | None, metric: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The best trial by validation ``metric`` among the rows matching ``where``, and its rows."""
    import pyarrow.compute as pc

    from densitune.results.store import filter_results, read_results
    from densitune.search.report.tables import best_config

    table = filter_results(read_results(results_dir), where)
    best = best_config(table, metric)
    mask = pc.and_(pc.equal(table["experiment"], best["experiment"]), pc.equal(table["trial_id"], best["trial_id"]))
    return best, table.filter(mask).to_pylist()


def export_detector(results_dir: str | Path, out: str | Path, *, where: str | None = None, metric: str = "auroc") -> Path:
    """Write the best search configuration among the rows matching ``where`` as a self-contained detector.

    ``out`` gets ``detector.json`` (score, density and its parameters, ε, input shape, where it came from),
    one folder per network (its ``model.pt`` and ``config.json``) and, for density scores, one
    ``density-<seed>.pt`` per network (:meth:`Density.state_dict`, fitted on the training split as the
    search fitted it). A score over single networks exports every seed of its group; an ensemble score
    exports every member. Returns ``out``.
    """
    from densitune.search.evaluate import Workspace
    from densitune.search.replay import replay_trial
    from densitune.trainables.train.checkpoint import load_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder")
    best, rows = _trial_rows(results_dir, where, metric)
    trial = replay_trial(results_dir, rows)
    name, eps = trial.params.score, trial.params.eps
    density, params = trial.params.density.name, dict(trial.params.density.params)
    cache = location(results_dir).parent / "cache"
    ws = Workspace(device=torch.device("cpu"), cache_dir=cache if isinstance(cache, Path) and cache.is_dir() else None)
    out.mkdir(parents=True, exist_ok=True)
    saved_models: dict[str, str] = {}
    manifest_members: list[dict[str, Any]] = []
    for seed, ckpts in trial.members:
        folders = []
        for ckpt in ckpts:
            if ckpt not in saved_models:
                folder = f"model-{len(saved_models)}"
                (out / folder).mkdir()
                for f in ("model.pt", "config.json"):
                    (out / folder / f).write_bytes((location(ckpt) / f).read_bytes())
                saved_models[ckpt] = folder
            folders.append(saved_models[ckpt])
        entry: dict[str, Any] = {"seed": seed, "models": folders}
        if score_class(name).uses_density:
            (ckpt,) = ckpts
            fitted = trial.fitted_density(ws, ckpt)
            entry["density"] = f"density-{len(manifest_members)}.pt"
            torch.save(fitted.state_dict(), out / entry["density"])
        manifest_members.append(entry)
    first = load_model(next(iter(saved_models)))
    manifest = {
        "format": FORMAT, "version": VERSION, "score": name, "density": density, "density_params": params, "eps": eps,
        "ensemble": score_class(name).ensemble, "members": manifest_members,
        "input": {"shape": list(first.data["shape"]), "range": [0.0, 1.0], "dataset": first.data["name"],
                  "normalisation": "inside the network (mean/std of the training data)"},
        "batch_size": trial.batch_size,
        "source": {"results": str(location(results_dir).resolve()), "experiment": best["experiment"],
                   "trial_id": best["trial_id"], "where": where, f"validation_{metric}": best["val"]},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:

    p = Path(path) / MANIFEST
    try:
        manifest = read_document(p)
    except FileNotFoundError:
        raise DensituneError(f"not an exported detector (no {MANIFEST}): {path}") from None
    except DocumentError as e:
        raise DensituneError(f"corrupt {p}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DensituneError(f"{p} is not a version-{VERSION} densitune detector")
    return manifest


def load_detector(path: str | Path, seed: int | None = None, device: str | torch.device = "cpu") -> Detector:
    """The detector :func:`export_detector` wrote to ``path``.

    A single-network score exported with several seeds gives one detector per seed: ``seed`` picks it
    (default: the first; ``detector.info["seeds"]`` lists them). Only JSON and ``weights_only`` loads.
    """
    from densitune.trainables.train.checkpoint import load_model

    path = Path(path)
    manifest = read_manifest(path)
    members = manifest["members"]
    seeds = [m["seed"] for m in members]
    if seed is None:
        member = members[0]
    else:
        matching = [m for m in members if m["seed"] == seed]
        if not matching:
            raise ConfigError(f"no seed {seed} in {path}; seeds: {seeds}")
        member = matching[0]
    models = [load_model(path / folder, device=device).model for folder in member["models"]]
    density = None
    if member.get("density"):
        try:
            state = torch.load(path / member["density"], map_location=device, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise DensituneError(f"corrupt density file {path / member['density']}: {str(e).splitlines()[0]}") from None
        density = density_from_state(state, device)
    info = {**manifest, "seeds": seeds, "seed": member["seed"]}
    return Detector(models, manifest["score"], density, manifest["eps"], manifest["batch_size"], info)
