"""Losses: exact values of the per-sample contrastive center loss, and what a step does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densitune.errors import ConfigError, UnknownNameError
from densitune.trainables.nets.losses import create_loss


def intra_inter_ratio(z: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> float:
    """Mean intra-class over mean inter-class squared distance of features to centers.

    z (N, D), y (N,), centers (C, D). Lower is more compact and better separated; the
    contrastive center loss is built to lower it.
    """
    d = (z.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(-1)
    intra = d.gather(1, y[:, None]).squeeze(1)
    inter = (d.sum(1) - intra) / (centers.shape[0] - 1)
    return float(intra.mean() / inter.mean())


def _data(n=12, c=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, d, generator=g), torch.arange(n) % c


def test_ce_is_cross_entropy():
    logits, z, y = _data()
    loss = create_loss("ce", num_classes=3, feature_dim=4)
    assert torch.equal(loss(logits, z, y), F.cross_entropy(logits, y))


def test_contrastive_center_is_per_sample_ratio():
    logits, z, y = _data()
    lam, delta = 0.3, 1.0
    loss = create_loss("contrastive", num_classes=3, feature_dim=4, lam=lam, delta=delta)
    c = loss.centers.detach()
    expected = []
    for i in range(len(y)):  # the formula of shared/METHODS.md, one sample at a time
        intra = ((z[i] - c[y[i]]) ** 2).sum()
        inter = sum(((z[i] - c[k]) ** 2).sum() for k in range(3) if k != y[i])
        expected.append(0.5 * intra / (inter + delta))
    want = F.cross_entropy(logits, y) + lam * torch.stack(expected).mean()
    assert torch.allclose(loss(logits, z, y), want, atol=1e-6)
    # and it is not the batch-level ratio some public snippets compute
    batch_ratio = 0.5 * sum(((z[i] - c[y[i]]) ** 2).sum() for i in range(len(y))) / (
        sum(sum(((z[i] - c[k]) ** 2).sum() for k in range(3) if k != y[i]) for i in range(len(y))) + delta
    )
    assert not torch.allclose(torch.stack(expected).mean(), batch_ratio, atol=1e-4)


def test_center_loss_value():
    logits, z, y = _data()
    loss = create_loss("center", num_classes=3, feature_dim=4, lam=2.0)
    c = loss.centers.detach()
    want = F.cross_entropy(logits, y) + 2.0 * 0.5 * ((z - c[y]) ** 2).sum(1).mean()
    assert torch.allclose(loss(logits, z, y), want, atol=1e-6)


def test_one_step_lowers_intra_inter_ratio():
    torch.manual_seed(0)
    _, z0, y = _data(n=60, c=3, d=5, seed=1)
    z = torch.nn.Parameter(z0.clone())
    loss = create_loss("contrastive", num_classes=3, feature_dim=5, lam=1.0)
    logits = torch.zeros(60, 3)  # CE constant: only the center term moves z
    opt = torch.optim.SGD([z, *loss.parameters()], lr=0.5)
    before = intra_inter_ratio(z.detach(), y, loss.centers.detach())
    opt.zero_grad()
    loss(logits, z, y).backward()
    opt.step()
    after = intra_inter_ratio(z.detach(), y, loss.centers.detach())
    assert after < before


def test_bad_loss_input():
    with pytest.raises(UnknownNameError, match="known: ce, center, contrastive"):
        create_loss("triplet", num_classes=3, feature_dim=4)
    with pytest.raises(ConfigError):
        create_loss("contrastive", num_classes=3, feature_dim=4, lam=-1)
