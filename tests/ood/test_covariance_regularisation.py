"""gmm_sum / gmm_max covariance regularisation against scikit-learn's estimates.

``shrinkage`` equals ``sklearn.covariance.LedoitWolf`` / ``OAS`` per class; ``reg_covar`` adds to the diagonal as
``sklearn.mixture.GaussianMixture`` does (its ``_estimate_gaussian_covariances_full`` with hard responsibilities);
the densities built from them equal scipy's multivariate normal log-pdf.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

sklearn = pytest.importorskip("sklearn")
from sklearn.covariance import OAS, LedoitWolf  # noqa: E402
from sklearn.mixture._gaussian_mixture import _estimate_gaussian_covariances_full  # noqa: E402

from densitune.errors import ConfigError  # noqa: E402
from densitune.search.ood.densities import create_density, density_from_state, shrunk_covariance  # noqa: E402
from densitune.search.spec import SearchSpec  # noqa: E402


def _data(n_per: int = 40, d: int = 12, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated, ill-conditioned classes (few samples per dimension, so shrinkage is far from 0)."""
    g = np.random.default_rng(seed)
    zs, ys = [], []
    for c in range(classes):
        a = g.normal(size=(d, d)) * np.logspace(0, -3, d)  # column scales 1 .. 1e-3
        zs.append(g.normal(size=(n_per, d)) @ a.T + 3.0 * c)
        ys.append(np.full(n_per, c))
    return torch.tensor(np.concatenate(zs)), torch.tensor(np.concatenate(ys))


@pytest.mark.parametrize("method, ref", [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
@pytest.mark.parametrize("name", ["gmm_sum", "gmm_max"])
def test_shrinkage_equals_sklearn(method, ref, name) -> None:
    z, y = _data()
    d = create_density(name, shrinkage=method).fit(z, y)
    for k in range(3):
        zc = z[y == k].numpy()
        est = ref().fit(zc)
        np.testing.assert_allclose(d.covariances_[k].numpy(), est.covariance_, rtol=1e-10, atol=1e-14)
        assert float(d.shrinkage_[k]) == pytest.approx(est.shrinkage_, rel=1e-10)
        assert 0 < est.shrinkage_ < 1  # the case is not trivial
    assert d.fitted_summary()["mean_shrinkage_"] == pytest.approx(float(d.shrinkage_.mean()))


@pytest.mark.parametrize("shrinkage", ["none", "ledoit_wolf"])
def test_reg_covar_adds_to_the_diagonal_as_gaussian_mixture(shrinkage) -> None:
    z, y = _data()
    reg = 1e-3
    d = create_density("gmm_sum", reg_covar=reg, shrinkage=shrinkage).fit(z, y)
    base = create_density("gmm_sum", shrinkage=shrinkage).fit(z, y)
    torch.testing.assert_close(d.covariances_, base.covariances_ + reg * torch.eye(z.shape[1], dtype=torch.float64))
    if shrinkage == "none":
        # GaussianMixture's M step with hard (one-hot) responsibilities, divisor |X_c| - 1 as this density's
        X = z.numpy()
        resp = np.eye(3)[y.numpy()]
        nk = resp.sum(0) - 1
        means = (resp.T @ X) / resp.sum(0)[:, None]
        ref = _estimate_gaussian_covariances_full(resp, X, nk, means, reg)
        np.testing.assert_allclose(d.covariances_.numpy(), ref, rtol=1e-10, atol=1e-14)
    # the density is the prior-weighted mixture of scipy normals with these covariances
    q = z[:17] + 0.1
    ref_ll = np.stack([multivariate_normal(d.means_[k].numpy(), d.covariances_[k].numpy()).logpdf(q.numpy())
                       for k in range(3)], axis=1)
    expected = logsumexp(ref_ll + np.log(1 / 3), axis=1)
    np.testing.assert_allclose(d.score_samples(q).numpy(), expected, rtol=1e-9)
    assert float(d.jitter_.max()) == 0.0


def test_jitter_ladder_still_catches_singular_covariances() -> None:
    z, y = _data(n_per=5, d=12)  # 5 samples in 12 dimensions: singular without regularisation
    assert float(create_density("gmm_sum").fit(z, y).jitter_.min()) > 0
    assert float(create_density("gmm_sum", shrinkage="oas").fit(z, y).jitter_.max()) == 0.0  # shrinkage: full rank
    assert float(create_density("gmm_sum", reg_covar=1e-2).fit(z, y).jitter_.max()) == 0.0


def test_defaults_unchanged_and_params_round_trip() -> None:
    z, y = _data()
    plain = create_density("gmm_sum").fit(z, y)
    cov = torch.stack([torch.cov(z[y == k].T) for k in range(3)])
    torch.testing.assert_close(plain.covariances_, cov)  # divisor |X_c| - 1, nothing added
    assert plain.fitted_summary() == {"n_classes_": 3, "max_jitter_": 0.0}
    for name in ("gmm_sum", "gmm_max"):
        d = create_density(name, reg_covar=1e-4, shrinkage="oas")
        assert create_density(name, **d.get_params()).get_params() == d.get_params()
        assert d.get_params()["reg_covar"] == 1e-4 and d.get_params()["shrinkage"] == "oas"
        fitted = d.fit(z, y)
        again = density_from_state(fitted.state_dict())
        torch.testing.assert_close(again.score_samples(z), fitted.score_samples(z))
    with pytest.raises(ConfigError):
        create_density("gmm_sum", shrinkage="ledoit")
    with pytest.raises(ConfigError):
        create_density("gmm_max", reg_covar=-1.0)


def test_shrunk_covariance_one_dimension() -> None:
    x = torch.randn(10, 1, dtype=torch.float64)
    x = x - x.mean(0)
    for method, ref in (("ledoit_wolf", LedoitWolf), ("oas", OAS)):
        cov, s = shrunk_covariance(x, method)
        assert float(s) == 0.0
        np.testing.assert_allclose(cov.numpy(), ref().fit(x.numpy()).covariance_)


def test_searchable_grid_records_the_parameters() -> None:
    from densitune.search.models import ModelGroup
    from densitune.search.space import grid_points
    from densitune.search.trial import density_columns

    group = ModelGroup("cnn-D8-ce", "cnn", 8, "ce", 0.0, False, "digits", 0, (0,), ("ckpt",))
    spec = SearchSpec(experiment="x", val_ood="digits-blend", test_ood=("noise-uniform",), eps_grid=(0.0,),
                      densities=("gmm_sum", "gmm_max"),
                      density_params={"gmm_sum": {"reg_covar": [0.0, 1e-4], "shrinkage": ["none", "ledoit_wolf", "oas"]},
                                      "gmm_max": {"shrinkage": ["oas"]}})
    points = grid_points(spec, [group])
    assert len(points) == 2 * 3 + 1
    recorded = [json.loads(density_columns(p)["density_params"]) for p in points]
    assert {(r["reg_covar"], r["shrinkage"]) for r in recorded[:6]} == {
        (a, b) for a in (0.0, 1e-4) for b in ("none", "ledoit_wolf", "oas")}
    assert recorded[6] == {"chunk_size": None, "prior": False, "reg_covar": 0.0, "shrinkage": "oas", "dtype": "float64"}


def _ill_conditioned(rng: np.random.Generator, n: int, d: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a Gaussian with covariance Q diag(logspace(0, -8, d)) Q^T: condition number 1e8."""
    zs, ys = [], []
    for c in range(4):
        q, _ = np.linalg.qr(np.random.default_rng(100 + c).normal(size=(d, d)))
        scale = np.sqrt(np.logspace(0, -8, d))
        mean = np.random.default_rng(200 + c).normal(size=d)
        zs.append((rng.normal(size=(n, d)) * scale) @ q.T + mean + shift * rng.normal(size=(n, d)) * scale[::-1])
        ys.append(np.full(n, c))
    return torch.tensor(np.concatenate(zs), dtype=torch.float32), torch.tensor(np.concatenate(ys))


@pytest.mark.parametrize("name", ["gmm_sum", "gmm_max"])
def test_float32_scoring_moves_auroc_less_than_1e_3_at_condition_1e8(name) -> None:
    from densitune.search.ood.metrics import auroc

    rng = np.random.default_rng(0)
    d = 64
    z_train, y_train = _ill_conditioned(rng, 1500, d, 0.0)
    z_id, _ = _ill_conditioned(rng, 250, d, 0.0)
    z_ood, _ = _ill_conditioned(rng, 250, d, 1e-3)  # a small shift along the near-degenerate directions
    d64 = create_density(name).fit(z_train, y_train)
    cond = torch.linalg.cond(d64.covariances_)
    assert float(cond.min()) > 1e7 and float(d64.jitter_.max()) == 0.0
    d32 = density_from_state({**d64.state_dict(), "params": {**d64.get_params(), "dtype": "float32"}})
    s64 = (d64.score_samples(z_id), d64.score_samples(z_ood))
    s32 = (d32.score_samples(z_id), d32.score_samples(z_ood))
    assert s32[0].dtype == torch.float64
    a64, a32 = auroc(*s64), auroc(*s32)
    assert 0.6 < a64 < 0.99  # a non-trivial ranking
    assert abs(a32 - a64) < 1e-3, (a64, a32)
    assert not torch.equal(s32[0], s64[0])  # it is another computation
