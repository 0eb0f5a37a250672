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


def _exact(train: torch.Tensor, query: torch.Tensor, h: float) -> np.ndarray:
    """The exact kernel sum in float64: scipy's pairwise distances and ``logsumexp`` over every training row."""
    n, d = train.shape
    return (logsumexp(-cdist(query.numpy(), train.numpy(), "sqeuclidean") / (2 * h * h), axis=1)
            - math.log(n) - 0.5 * d * math.log(2 * math.pi * h * h))


@pytest.fixture(scope="module")
def hard_kde_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """D = 512: training clusters whose scales span 0.05 to 20, queries from a training row itself (distance 0)
    to rows so far out that every kernel value underflows float64's exp (a spread of > 10^4 nats)."""
    g = torch.Generator().manual_seed(7)
    d = 512
    scales = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    centres = torch.randn(4, d, generator=g, dtype=torch.float64) * 10.0
    train = torch.cat([centres[k] + scales[k] * torch.randn(600, d, generator=g, dtype=torch.float64)
                       for k in range(4)])
    query = torch.cat([
        train[[0, 700, 1300, 2000]],  # training rows: one kernel at distance exactly 0
        centres.repeat_interleave(5, 0) + 0.1 * torch.randn(20, d, generator=g, dtype=torch.float64),
        centres[:2].repeat_interleave(5, 0) + 3.0 * torch.randn(10, d, generator=g, dtype=torch.float64),
        centres[1] + 400.0 + torch.randn(6, d, generator=g, dtype=torch.float64),  # every kernel underflows
    ])
    return train, query


@pytest.mark.parametrize("chunk_size", [None, 37, 10_000])
def test_fast_kde_equals_the_exact_sum_on_hard_inputs_at_d512(hard_kde_inputs, chunk_size) -> None:
    """The no-autograd path (one GEMM per block, exp in place) and the differentiable path both equal scipy's
    exact logsumexp to 1e-6 nats, and each other to 1e-9, on rows spread over > 10^4 nats."""
    train, query = hard_kde_inputs
    dens = create_density("kde", chunk_size=chunk_size).fit(train)
    ref = _exact(train, query, dens.bandwidth_)
    assert ref.max() - ref.min() > 1e4 and np.isfinite(ref).all()
    # the far rows' largest kernel value is below float64's smallest positive number: a plain exp-sum gives -inf
    far_d2 = cdist(query[-6:].numpy(), train.numpy(), "sqeuclidean").min(axis=1)
    assert (far_d2 / (2 * dens.bandwidth_**2) > 746).all()
    fast = dens.score_samples(query)
    assert fast.dtype == torch.float64 and fast.shape == (len(query),) and not fast.requires_grad
    np.testing.assert_allclose(fast.numpy(), ref, rtol=0, atol=1e-6)
    q = query.clone().requires_grad_(True)
    slow = dens.score_samples(q)  # the differentiable path
    assert slow.requires_grad
    np.testing.assert_allclose(slow.detach().numpy(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-9)
    with torch.no_grad():  # a query that requires grad, under no_grad: the fast path, the same values
        torch.testing.assert_close(dens.score_samples(q), fast, rtol=0, atol=0)


def test_fast_kde_handles_empty_and_single_row_queries(hard_kde_inputs) -> None:
    train, query = hard_kde_inputs
    dens = create_density("kde", bandwidth=3.0, chunk_size=5).fit(train[:11])  # 11 rows: blocks of 5, 5, 1
    assert dens.score_samples(query[:0]).shape == (0,)
    np.testing.assert_allclose(dens.score_samples(query[4:5]).numpy(), _exact(train[:11], query[4:5], 3.0),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_fast_kde_when_a_later_training_block_lies_far_above_the_first(chunk_size) -> None:
    """The no-autograd path offsets each query row by its max over the first training block; a later block whose
    kernel values lie > 709 nats above that (its exp-sum would overflow) must still give the exact sum."""
    g = torch.Generator().manual_seed(11)
    d = 512
    far = 60.0 + torch.randn(3000, d, generator=g, dtype=torch.float64)  # the first block(s): far from the query
    near = torch.randn(40, d, generator=g, dtype=torch.float64)
    train = torch.cat([far, near])
    query = near[:5] + 0.3 * torch.randn(5, d, generator=g, dtype=torch.float64)
    dens = create_density("kde", bandwidth=1.0, chunk_size=chunk_size).fit(train)
    ref = _exact(train, query, 1.0)
    d2 = cdist(query.numpy(), train.numpy(), "sqeuclidean") / 2
    assert (d2[:, :16].min(axis=1) - d2[:, 3000:].min(axis=1) > 1000).all()  # the near rows: > 1000 nats higher
    np.testing.assert_allclose(dens.score_samples(query).numpy(), ref, rtol=0, atol=1e-6)


def test_fast_kde_operand_follows_a_refit_and_a_loaded_state(hard_kde_inputs) -> None:
    """The cached (N, D + 2) GEMM operand is rebuilt when the fitted state changes, and is never saved."""
    from densitune.search.ood.densities import density_from_state

    train, query = hard_kde_inputs
    dens = create_density("kde", bandwidth=3.0)
    a, b = train[:900], train[900:1500]
    dens.fit(a).score_samples(query)
    refit = dens.fit(b).score_samples(query)
    np.testing.assert_allclose(refit.numpy(), _exact(b, query, 3.0), rtol=0, atol=1e-6)
    state = dens.state_dict()
    assert set(state["fitted"]) == {"mean_", "train_", "train_sq_", "bandwidth_", "n_train_", "n_features_in_"}
    torch.testing.assert_close(density_from_state(state).score_samples(query), refit, rtol=0, atol=0)
