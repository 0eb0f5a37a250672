"""Training losses: cross-entropy, optionally plus a (contrastive) center loss.

Every loss is an ``nn.Module`` called as ``loss(logits, z, y) -> scalar`` so the
training loop does not care which one it has. Centers are learnable parameters of
the loss module; they are optimised with the network and saved in the checkpoint.

* ``ce``: cross-entropy.
* ``center``: CE + λ · ½ mean_i ‖z_i − c_{y_i}‖² (Wen et al., ECCV 2016).
* ``contrastive``: CE + λ · mean_i ½ ‖z_i − c_{y_i}‖² / (Σ_{k≠y_i} ‖z_i − c_k‖² + δ)
  (Qi & Su 2017; the research note §3.1, *per-sample* ratio).

Departure from the formulas: the sums over the batch are divided by the batch size
(a mean), so that λ means the same at every batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densitune.errors import ConfigError
from densitune.registry import Registry

LOSSES: Registry = Registry("loss")


class CrossEntropy(nn.Module):
    """Plain cross-entropy; ``z`` is ignored."""

    def __init__(self, num_classes: int, feature_dim: int, **_: float) -> None:
        super().__init__()

    def forward(self, logits: Tensor, z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)


class _CenterBase(nn.Module):
    def __init__(self, num_classes: int, feature_dim: int, lam: float = 0.1, delta: float = 1.0) -> None:
        super().__init__()
        if lam < 0:
            raise ConfigError(f"center-loss weight lambda must be >= 0, got {lam}")
        if delta <= 0:
            raise ConfigError(f"contrastive center loss delta must be > 0, got {delta}")
        self.lam = float(lam)
        self.delta = float(delta)
        # Centers start at small random values (as in Qi & Su's reference code) so
        # that the inter-class denominator is non-zero from the first step.
        self.centers = nn.Parameter(torch.randn(num_classes, feature_dim) * 0.1)

    def sq_dists(self, z: Tensor) -> Tensor:
        """(N, D) features -> (N, C) squared distances to every center."""
        return (z.unsqueeze(1) - self.centers.unsqueeze(0)).pow(2).sum(-1)

    def center_term(self, z: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, logits: Tensor, z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y) + self.lam * self.center_term(z.float(), y)


class CenterLoss(_CenterBase):
    """CE + λ · ½ ‖z − c_y‖² (mean over the batch)."""

    def center_term(self, z: Tensor, y: Tensor) -> Tensor:
        d = self.sq_dists(z)
        return 0.5 * d.gather(1, y[:, None]).squeeze(1).mean()


class ContrastiveCenterLoss(_CenterBase):
    """CE + λ · ½ ‖z − c_y‖² / (Σ_{k≠y} ‖z − c_k‖² + δ), per sample, mean over the batch."""

    def center_term(self, z: Tensor, y: Tensor) -> Tensor:
        d = self.sq_dists(z)  # (N, C)
        intra = d.gather(1, y[:, None]).squeeze(1)
        inter = d.sum(1) - intra
        return (0.5 * intra / (inter + self.delta)).mean()


LOSSES.add("ce", CrossEntropy)
LOSSES.add("center", CenterLoss)
LOSSES.add("contrastive", ContrastiveCenterLoss)


def create_loss(name: str, *, num_classes: int, feature_dim: int, lam: float = 0.1, delta: float = 1.0) -> nn.Module:
    """Build the loss ``name`` (see module docstring); unknown names list the known ones."""
    return LOSSES.get(name)(num_classes, feature_dim, lam=lam, delta=delta)
