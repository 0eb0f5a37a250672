"""The KDE equals the exact kernel sum (a scipy ``logsumexp`` over every training row) to 1e-6, chunked or not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from densitune.search.ood.densities import create_density


@pytest.mark.parametrize("chunk_size", [None, 37])
def test_kde_equals_the_exact_scipy_logsumexp(chunk_size) -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(700, 64, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, 64) + 3.0
    query = torch.cat([torch.randn(60, 64, generator=g, dtype=torch.float64) + 3.0,
                       torch.randn(40, 64, generator=g, dtype=torch.float64) * 3.0])  # near and far rows
    dens = create_density("kde", chunk_size=chunk_size).fit(train)
    h, (n, d) = dens.bandwidth_, train.shape
    ref = (logsumexp(-cdist(query.numpy(), train.numpy(), "sqeuclidean") / (2 * h * h), axis=1)
           - math.log(n) - 0.5 * d * math.log(2 * math.pi * h * h))
    ours = dens.score_samples(query)
    assert ours.dtype == torch.float64 and ours.shape == (100,)
    assert ref.min() < ref.max() - 50  # the far rows lie many nats below the near ones
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
