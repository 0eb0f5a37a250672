"""Tests for densitune.search.ood.densities: references from scipy / sklearn, the jitter ladder, and the Density contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.neighbors import KernelDensity

from densitune.errors import ConfigError, DensituneError, UnknownNameError
from densitune.search.ood.densities import (
    DENSITIES,
    JITTERS,
    ClassConditionalGaussian,
    cholesky_with_jitter,
    create_density,
)


def _class_data(seed: int = 0, n_per_class: tuple[int, ...] = (40, 25, 60), d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian classes with different means and random full covariances, (N, D) float64 + (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    zs, ys = [], []
    for c, n in enumerate(n_per_class):
        a = torch.randn(d, d, generator=g, dtype=torch.float64)
        zs.append(torch.randn(n, d, generator=g, dtype=torch.float64) @ a + 3.0 * c)
        ys.append(torch.full((n,), c, dtype=torch.int64))
    return torch.cat(zs), torch.cat(ys)


def _scipy_class_loglik(z: np.ndarray, y: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: scipy log N(q; mu_c, Sigma_c) (M, C) with Sigma_c = np.cov(ddof=1), and log pi_c (C,)."""
    classes = np.unique(y)
    ll = np.stack(
        [multivariate_normal(mean=z[y == c].mean(0), cov=np.cov(z[y == c], rowvar=False, ddof=1)).logpdf(q) for c in classes],
        axis=1,
    )
    log_pi = np.log(np.array([(y == c).sum() for c in classes]) / len(y))
    return ll, log_pi


# ---------------------------------------------------------------------------------------------------------
# class-conditional Gaussians against scipy
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gmm_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    z, y = _class_data()
    q = torch.randn(30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 2
    ll, log_pi = _scipy_class_loglik(z.numpy(), y.numpy(), q.numpy())
    return z, y, q, ll, log_pi


def test_gmm_sum_matches_scipy_with_prior(gmm_reference) -> None:
    z, y, q, ll, log_pi = gmm_reference
    ours = create_density("gmm_sum").fit(z, y).score_samples(q).numpy()
    np.testing.assert_allclose(ours, logsumexp(ll + log_pi, axis=1), rtol=0, atol=1e-6)


def test_gmm_sum_without_prior_matches_ddu_logsumexp(gmm_reference) -> None:
    z, y, q, ll, _ = gmm_reference
    ours = create_density("gmm_sum", prior=False).fit(z, y).score_samples(q).numpy()
    np.testing.assert_allclose(ours, logsumexp(ll, axis=1), rtol=0, atol=1e-6)


def test_gmm_max_matches_scipy(gmm_reference) -> None:
    z, y, q, ll, log_pi = gmm_reference
    ours = create_density("gmm_max").fit(z, y).score_samples(q).numpy()
    np.testing.assert_allclose(ours, ll.max(axis=1), rtol=0, atol=1e-6)
    with_prior = create_density("gmm_max", prior=True).fit(z, y).score_samples(q).numpy()
    np.testing.assert_allclose(with_prior, (ll + log_pi).max(axis=1), rtol=0, atol=1e-6)


def test_gmm_fitted_attributes(gmm_reference) -> None:
    z, y, *_ = gmm_reference
    d = create_density("gmm_sum").fit(z, y)
    assert d.classes_.tolist() == [0, 1, 2]
    assert d.counts_.tolist() == [40, 25, 60]
    for k in range(3):
        zc = z[y == k].numpy()
        np.testing.assert_allclose(d.means_[k].numpy(), zc.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(d.covariances_[k].numpy(), np.cov(zc, rowvar=False, ddof=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.log_prior_.exp().numpy(), [40 / 125, 25 / 125, 60 / 125], rtol=1e-15)
    assert d.jitter_.tolist() == [0.0, 0.0, 0.0]
    assert d.means_.dtype == d.covariances_.dtype == d.cholesky_.dtype == torch.float64
    assert d.class_log_likelihood(z[:4]).shape == (4, 3)


def test_gmm_non_contiguous_labels_and_float32_input(gmm_reference) -> None:
    z, y, q, ll, log_pi = gmm_reference
    relabelled = torch.tensor([7, -2, 40])[y]  # sorted classes: -2, 7, 40 -> scipy order 1, 0, 2
    d = create_density("gmm_sum").fit(z.float(), relabelled)
    assert d.classes_.tolist() == [-2, 7, 40]
    # float32 features lose precision in the fit, so compare loosely; the score is still float64
    out = d.score_samples(q.float())
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), logsumexp(ll + log_pi, axis=1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_gmm_chunking_does_not_change_scores(gmm_reference, chunk_size: int) -> None:
    z, y, q, *_ = gmm_reference
    full = create_density("gmm_sum").fit(z, y).score_samples(q)
    chunked = create_density("gmm_sum", chunk_size=chunk_size).fit(z, y).score_samples(q)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)


def test_gmm_class_with_one_sample_raises() -> None:
    z = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(DensituneError, match="fewer than 2"):
        create_density("gmm_sum").fit(z, torch.tensor([0, 0, 0, 0, 1]))


def test_gmm_rejects_float_labels() -> None:
    z = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(DensituneError, match="integers"):
        create_density("gmm_sum").fit(z, torch.zeros(6))


# ---------------------------------------------------------------------------------------------------------
# jitter ladder
# ---------------------------------------------------------------------------------------------------------


def test_jitter_ladder_matches_ddu() -> None:
    assert JITTERS[0] == 0.0
    assert JITTERS[1] == torch.finfo(torch.float64).tiny
    assert JITTERS[2] == 1e-308 and JITTERS[-1] == 1e-1
    assert len(JITTERS) == 2 + 308


def test_cholesky_with_jitter_positive_definite_needs_no_jitter() -> None:
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cov = a @ a.T + torch.eye(4, dtype=torch.float64)
    L, jitter = cholesky_with_jitter(cov)
    assert jitter.shape == () and float(jitter) == 0.0
    torch.testing.assert_close(L, torch.linalg.cholesky(cov), rtol=0, atol=0)


def _naive_ladder(cov: torch.Tensor) -> float:
    """DDU's loop, without skipping no-op jitters: the first j for which cov + j I factorises."""
    for j in JITTERS:
        _, info = torch.linalg.cholesky_ex(cov + j * torch.eye(cov.shape[0], dtype=cov.dtype))
        if int(info) == 0:
            return j
    raise AssertionError("ladder exhausted")


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e4])
def test_cholesky_with_jitter_singular_matrix_uses_same_jitter_as_ddu_loop(scale: float) -> None:
    v = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    cov = scale * (v.T @ v)  # rank 1
    L, jitter = cholesky_with_jitter(cov)
    assert float(jitter) == _naive_ladder(cov) > 0
    torch.testing.assert_close(L @ L.T, cov + float(jitter) * torch.eye(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_cholesky_with_jitter_batched_records_jitter_per_matrix() -> None:
    good = torch.eye(3, dtype=torch.float64) * 2
    v = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    bad = v.T @ v
    L, jitter = cholesky_with_jitter(torch.stack([good, bad, good]))
    assert L.shape == (3, 3, 3)
    assert jitter[0] == 0 and jitter[2] == 0 and jitter[1] > 0
    torch.testing.assert_close(L[0], torch.linalg.cholesky(good), rtol=0, atol=0)


def test_cholesky_with_jitter_propagates_other_errors() -> None:
    def broken(_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("other")

    with pytest.raises(RuntimeError, match="^other$"):
        cholesky_with_jitter(torch.eye(3, dtype=torch.float64), cholesky=broken)

    calls = []

    def fails_then_breaks(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(a)
        if len(calls) == 1:  # first attempt: "not positive definite"
            return torch.zeros_like(a), torch.ones(a.shape[:-2], dtype=torch.int32)
        raise RuntimeError("other")  # an unrelated failure inside the ladder must not be swallowed

    with pytest.raises(RuntimeError, match="^other$"):
        cholesky_with_jitter(torch.eye(3, dtype=torch.float64), cholesky=fails_then_breaks)
    assert len(calls) == 2


def test_cholesky_with_jitter_exhausted_ladder_raises() -> None:
    def never_pd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(a), torch.ones(a.shape[:-2], dtype=torch.int32)

    with pytest.raises(DensituneError, match="not positive definite"):
        cholesky_with_jitter(torch.eye(2, dtype=torch.float64), cholesky=never_pd)


def test_gmm_fits_rank_deficient_features_with_jitter() -> None:
    # D = 6 features, one of them exactly constant for every class: Sigma_c has an exactly-zero row, so the
    # plain Cholesky must fail (zero pivot) whatever the BLAS rounding.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(90, 6, generator=g, dtype=torch.float64)
    z[:, 5] = 0.0
    y = torch.arange(90) % 3
    d = create_density("gmm_sum").fit(z, y)
    assert (d.jitter_ > 0).all()
    assert torch.isfinite(d.score_samples(z)).all()
    eye = torch.eye(6, dtype=torch.float64)
    for k in range(3):
        L = d.cholesky_[k]
        torch.testing.assert_close(L @ L.T, d.covariances_[k] + d.jitter_[k] * eye, rtol=1e-12, atol=1e-12)


def test_gmm_fits_features_in_a_subspace() -> None:
    # D = 6 features that lie in a 3-dim subspace (rank 3 covariances): the fit succeeds and in-subspace
    # scores are finite (whether rounding lets jitter 0 pass is BLAS-dependent, so only >= 0 is asserted).
    g = torch.Generator().manual_seed(1)
    z = torch.randn(120, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.arange(120) % 3
    for name in ("gmm_sum", "gmm_max"):
        d = create_density(name).fit(z, y)
        assert d.jitter_.shape == (3,) and (d.jitter_ >= 0).all()
        assert torch.isfinite(d.score_samples(z)).all()


# ---------------------------------------------------------------------------------------------------------
# KDE against sklearn
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kde_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    train = torch.randn(150, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 5.0
    test = torch.randn(40, 4, generator=g, dtype=torch.float64) * 2.0 + 5.0
    return train, test


def test_kde_matches_sklearn_for_fixed_bandwidth(kde_data) -> None:
    train, test = kde_data
    ref = KernelDensity(kernel="gaussian", bandwidth=0.7).fit(train.numpy()).score_samples(test.numpy())
    ours = create_density("kde", bandwidth=0.7).fit(train).score_samples(test)
    assert ours.dtype == torch.float64 and ours.shape == (40,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_kde_chunked_equals_unchunked(kde_data, chunk_size: int) -> None:
    train, test = kde_data
    full = create_density("kde", bandwidth=0.7, chunk_size=10_000).fit(train).score_samples(test)
    chunked = create_density("kde", bandwidth=0.7, chunk_size=chunk_size).fit(train).score_samples(test)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rule", ["scott", "silverman"])
def test_kde_bandwidth_rules_are_sklearn_rules_times_rms_std(kde_data, rule: str) -> None:
    train, _ = kde_data
    sk = KernelDensity(kernel="gaussian", bandwidth=rule).fit(train.numpy()).bandwidth_
    sigma = math.sqrt(float(train.var(dim=0, correction=1).mean()))
    d = create_density("kde", bandwidth=rule).fit(train)
    assert d.bandwidth_ == pytest.approx(sk * sigma, rel=1e-12)
    # on features standardised to unit variance the rule is sklearn's exactly
    standardised = (train - train.mean(0)) / train.std(0, correction=1)
    d_std = create_density("kde", bandwidth=rule).fit(standardised)
    assert d_std.bandwidth_ == pytest.approx(sk, rel=1e-12)
    ref = KernelDensity(kernel="gaussian", bandwidth=rule).fit(standardised.numpy()).score_samples(standardised[:10].numpy())
    np.testing.assert_allclose(d_std.score_samples(standardised[:10]).numpy(), ref, rtol=0, atol=1e-6)


def test_kde_bandwidth_is_scale_equivariant(kde_data) -> None:
    train, test = kde_data
    a = create_density("kde").fit(train)
    b = create_density("kde").fit(train * 10)
    assert b.bandwidth_ == pytest.approx(10 * a.bandwidth_, rel=1e-12)
    # log q changes by exactly -D log 10 under z -> 10 z
    torch.testing.assert_close(b.score_samples(test * 10), a.score_samples(test) - 4 * math.log(10), rtol=0, atol=1e-9)


def test_kde_max_train_subsample_is_seeded(kde_data) -> None:
    train, test = kde_data
    a = create_density("kde", max_train=50, random_state=0).fit(train)
    b = create_density("kde", max_train=50, random_state=0).fit(train)
    c = create_density("kde", max_train=50, random_state=1).fit(train)
    assert a.n_train_ == 50 and a.train_.shape == (50, 4)
    assert torch.equal(a.score_samples(test), b.score_samples(test))
    assert not torch.equal(a.train_, c.train_)
    # max_train >= N keeps everything
    assert create_density("kde", max_train=10_000).fit(train).n_train_ == 150


def test_kde_ignores_labels(kde_data) -> None:
    train, test = kde_data
    a = create_density("kde", bandwidth=0.5).fit(train)
    b = create_density("kde", bandwidth=0.5).fit(train, torch.arange(150) % 3)
    assert torch.equal(a.score_samples(test), b.score_samples(test))


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("nan"), float("inf"), "auto", True, None])
def test_kde_bad_bandwidth_is_config_error(bandwidth) -> None:
    with pytest.raises(ConfigError):
        create_density("kde", bandwidth=bandwidth)


def test_kde_zero_variance_with_rule_raises() -> None:
    with pytest.raises(DensituneError, match="zero variance"):
        create_density("kde").fit(torch.ones(10, 3))


# ---------------------------------------------------------------------------------------------------------
# factory and registry
# ---------------------------------------------------------------------------------------------------------


def test_registered_names() -> None:
    assert DENSITIES.names() == ["gmm_max", "gmm_sum", "kde"]


def test_unknown_density_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="gmm_max, gmm_sum, kde"):
        create_density("flow")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("gmm_sum", {"aggregation": "max"}),  # fixed by the registered name
        ("gmm_sum", {"bandwidth": 1.0}),
        ("gmm_max", {"prior": "yes"}),
        ("gmm_sum", {"chunk_size": 0}),
        ("kde", {"max_train": 0}),
        ("kde", {"chunk_size": 2.5}),
        ("kde", {"prior": True}),
    ],
)
def test_bad_params_are_config_errors(name: str, params: dict) -> None:
    with pytest.raises(ConfigError):
        create_density(name, **params)


def test_describe_gives_the_row_columns_name_params_and_fitted_scalars(kde_data) -> None:
    train, _ = kde_data
    kde = create_density("kde", bandwidth="silverman", max_train=100)
    params = '{"bandwidth": "silverman", "chunk_size": null, "max_train": 100, "random_state": 0}'
    assert kde.describe() == {"density": "kde", "density_params": params, "density_fit": None}
    kde.fit(train)
    desc = kde.describe()
    assert desc["density_params"] == params
    assert json.loads(desc["density_fit"]) == {"bandwidth_": kde.bandwidth_, "n_train_": 100}
    gmm = create_density("gmm_max")
    assert isinstance(gmm, ClassConditionalGaussian)
    assert gmm.describe() == {"density": "gmm_max", "density_params": '{"chunk_size": null, "dtype": "float64", '
                              '"prior": false, "reg_covar": 0.0, "shrinkage": "none"}', "density_fit": None}
    assert repr(gmm) == "GMMMax(prior=False, chunk_size=None, reg_covar=0.0, shrinkage='none', dtype='float64')"
