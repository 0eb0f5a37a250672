"""Scoring, step by step: features -> density -> scores -> detection metrics.

Named functions a reader can follow (and a cache can wrap): :func:`extract_features` runs a model
over a data set once; :func:`fit_density` fits a density on training features; :func:`score_inputs`
scores a data set with a trial's score and ε (from cached features when ε = 0, through input
perturbation otherwise); :func:`detection_metrics` compares ID and OOD scores. No caching and no
selection protocol here: :mod:`densitune.search.workspace` caches, :mod:`densitune.search.evaluate`
decides which data each step sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset, TensorDataset

from densitune.errors import DensituneError
from densitune.search.ood.densities import Density
from densitune.search.ood.density_spec import DensitySpec
from densitune.search.ood.metrics import ood_metrics
from densitune.search.ood.scores import FeatureModel, Score

__all__ = ["Features", "batches", "detection_metrics", "extract_features", "fit_density", "gradient_signs", "id_accuracy",
           "score_inputs", "score_signed"]


@dataclass
class Features:
    """Clean features of one data split under one model: z (N, D), logits (N, K), y (N,)."""

    z: Tensor
    logits: Tensor
    y: Tensor


def batches(data: Dataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The (x (B, C, H, W), y (B,)) batches of ``data`` in order, as ``DataLoader(data, batch_size)`` gives them.

    An in-memory ``TensorDataset`` is sliced (views: scoring never writes to its inputs) instead of fetched item by
    item and stacked again, which cost about a tenth of a forward pass of the small CNN per input; the same values.
    """
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
    else:
        yield from DataLoader(data, batch_size=batch_size)


@torch.no_grad()
@parametrize.cached()  # a spectral-normalised weight computed once per pass over the data, not once per batch
def extract_features(model: FeatureModel, data: Dataset, batch_size: int, device: torch.device) -> Features:
    """``model``'s clean features and logits of every item of ``data`` (kept on the CPU, float32)."""
    zs, ls, ys = [], [], []
    for x, y in batches(data, batch_size):
        z, logits = model.features_and_logits(x.to(device))
        zs.append(z.float().cpu())
        ls.append(logits.float().cpu())
        ys.append(y)
    return Features(torch.cat(zs), torch.cat(ls), torch.cat(ys))


def fit_density(
    spec: DensitySpec, train: Features, device: torch.device, head: tuple[Tensor, Tensor] | None = None
) -> Density:
    """The density ``spec`` names, fitted on the training features (z (N, D), y (N,)) on ``device``.

    ``head`` is the classifier's (weight (C, D), bias (C,)), given to a density that needs it (``vim``).
    """
    density = spec.build()
    if density.needs_head:
        if head is None:
            raise DensituneError(f"{spec.name} needs the model's classifier head (model.head, an nn.Linear)")
        density.set_head(*head)
    return density.fit(train.z.to(device), train.y.to(device))


def score_inputs(
    score: Score, data: Dataset, eps: float, feats: Sequence[Features], batch_size: int, device: torch.device
) -> Tensor:
    """(N,) float64 scores of ``data`` under ``score`` after input perturbation ε (higher = more ID).

    ε = 0 uses the clean features ``feats`` (one per model of the score) when the score allows it;
    otherwise every batch goes through :meth:`Score.evaluate` (perturbation, then the score).
    """
    if eps == 0:
        fast = _from_features(score, feats, batch_size, device)
        if fast is not None:
            return fast
    with parametrize.cached():
        out = [score.evaluate(x.to(device), eps).double().cpu() for x, _ in batches(data, batch_size)]
    return torch.cat(out)


def _from_features(score: Score, feats: Sequence[Features], batch_size: int, device: torch.device) -> Tensor | None:
    """(N,) float64 scores from clean features, ``batch_size`` rows at a time (so the memory a density needs
    grows with the batch, not the data set); None when the score needs the inputs."""
    n = len(feats[0].z)
    out = []
    for start in range(0, max(n, 1), batch_size):
        rows = slice(start, start + batch_size)
        fast = score.from_features([(f.z[rows].to(device), f.logits[rows].to(device)) for f in feats])
        if fast is None:
            return None
        out.append(fast.detach().double().cpu())
    return torch.cat(out)


@parametrize.cached()
def gradient_signs(score: Score, data: Dataset, batch_size: int, device: torch.device) -> Tensor:
    """(N, C, H, W) int8 sign of the perturbation gradient of every item of ``data`` (kept on the CPU).

    What input perturbation computes for any ε > 0 (:meth:`Score.gradient_sign`), batch by batch as
    :func:`score_inputs` does; :func:`score_signed` then scores any ε with one forward pass per batch.
    """
    out: Tensor | None = None
    start = 0
    for x, _ in batches(data, batch_size):
        sign = score.gradient_sign(x.to(device)).cpu()
        if out is None:  # filled in place: no second copy of all N signs at the end
            out = torch.empty((len(cast(Sized, data)), *sign.shape[1:]), dtype=torch.int8)
        out[start:start + len(sign)] = sign
        start += len(sign)
    if out is None:
        raise ValueError("no inputs to take gradient signs of")
    return out


@parametrize.cached()
def score_signed(
    score: Score, data: Dataset, eps: float, signs: Tensor, batch_size: int, device: torch.device
) -> Tensor:
    """:func:`score_inputs` for ε > 0 from :func:`gradient_signs` ``signs`` (N, C, H, W): (N,) float64, the same
    numbers (same batches, same arithmetic), one forward pass per batch instead of forward, backward, forward."""
    out, start = [], 0
    for x, _ in batches(data, batch_size):
        sign = signs[start:start + len(x)]
        start += len(x)
        out.append(score.evaluate_signed(x.to(device), sign.to(device), eps).double().cpu())
    if start != len(signs):
        raise ValueError(f"{len(signs)} gradient signs for {start} inputs")
    return torch.cat(out)


def id_accuracy(feats: Sequence[Features]) -> float:
    """Accuracy of the mean softmax over the models (one model: its own accuracy) on clean ID features."""
    probs = torch.stack([f.logits.double().softmax(1) for f in feats]).mean(0)
    return float((probs.argmax(1) == feats[0].y).double().mean())


def detection_metrics(s_id: Tensor, s_ood: Tensor, id_feats: Sequence[Features]) -> dict[str, Any]:
    """AUROC / AUPRC / FPR95 of ID (N_id,) vs OOD (N_ood,) scores, the set sizes and the ID accuracy."""
    m: dict[str, Any] = ood_metrics(s_id, s_ood)
    m.update(n_id=len(s_id), n_ood=len(s_ood), id_accuracy=id_accuracy(id_feats))
    return m
