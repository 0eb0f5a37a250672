"""Contract tests over EVERY registered density and score (cf. Optuna's tests/samplers_tests/test_samplers.py).

The parameter lists are read from the registries, so a newly registered density or score is covered without
editing this file. Maths of the individual implementations is tested in test_densities.py / test_scores.py;
here each one must honour the interface the search relies on.
"""

from __future__ import annotations

import pytest
import torch

from densitune.errors import ConfigError, DensituneError, NotFittedError
from densitune.search.ood.densities import DENSITIES, create_density
from densitune.search.ood.scores import SCORES, create_score, score_class
from densitune.trainables.data import load_split
from densitune.trainables.nets.backbones import create_model

DENSITY_NAMES = DENSITIES.names()
SCORE_NAMES = SCORES.names()

MODEL_KW = dict(in_channels=1, image_size=8, num_classes=10, feature_dim=8, mean=(0.3,), std=(0.37,))

N_FIT, D, C = 150, 5, 3


def test_registries_are_not_empty() -> None:
    # guards the parametrisation below against silently running zero cases
    assert {"gmm_sum", "gmm_max", "kde"} <= set(DENSITY_NAMES)
    assert {"density", "diff", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy"} <= set(SCORE_NAMES)


# ---------------------------------------------------------------------------------------------------------
# densities
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(150, 5) float32 features of 3 well-separated Gaussian classes, with int64 labels."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N_FIT) % C
    centres = torch.randn(C, D, generator=g) * 3.0
    z = centres[y] + torch.randn(N_FIT, D, generator=g)
    return z.float(), y.to(torch.int64)


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return torch.randn(17, D, generator=torch.Generator().manual_seed(1)) * 2.0


@pytest.mark.parametrize("name", DENSITY_NAMES)
class TestDensityContract:
    def test_fit_returns_self(self, name, fit_data) -> None:
        density = create_density(name)
        assert density.fit(*fit_data) is density

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_score_samples_shape_dtype_finite(self, name, dtype, fit_data, queries) -> None:
        density = create_density(name).fit(*fit_data)
        out = density.score_samples(queries.to(dtype))
        assert out.shape == (queries.shape[0],)
        assert out.dtype == torch.float64
        assert torch.isfinite(out).all()
        # the query dtype does not change the value beyond float32 rounding of the query itself
        if dtype == torch.float32:
            torch.testing.assert_close(out, density.score_samples(queries.double()), rtol=1e-5, atol=1e-5)

    def test_empty_query_gives_empty_scores(self, name, fit_data) -> None:
        density = create_density(name).fit(*fit_data)
        out = density.score_samples(torch.empty(0, D))
        assert out.shape == (0,) and out.dtype == torch.float64

    def test_not_fitted_error_before_fit(self, name, queries) -> None:
        density = create_density(name)
        with pytest.raises(NotFittedError):
            density.score_samples(queries)

    def test_deterministic(self, name, fit_data, queries) -> None:
        a = create_density(name).fit(*fit_data).score_samples(queries)
        b = create_density(name).fit(*fit_data).score_samples(queries)
        assert torch.equal(a, b)
        # refitting the same object gives the same scores too
        density = create_density(name).fit(*fit_data)
        density.fit(*fit_data)
        assert torch.equal(density.score_samples(queries), a)

    def test_differentiable_wrt_float32_query(self, name, fit_data, queries) -> None:
        density = create_density(name).fit(*fit_data)
        q = queries.float().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(density.score_samples(q).sum(), q)
        assert grad.shape == q.shape and grad.dtype == torch.float32
        assert torch.isfinite(grad).all()
        assert (grad.abs().sum(1) > 0).all()  # a Gaussian-based log-density has no flat spots here

    def test_higher_near_the_data_than_far_away(self, name, fit_data) -> None:
        z, y = fit_data
        density = create_density(name).fit(z, y)
        near = torch.stack([z[y == c].mean(0) for c in range(C)])
        far = near + 50.0
        s_near, s_far = density.score_samples(near), density.score_samples(far)
        assert (s_near > s_far).all()

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_query_raises(self, name, bad, fit_data, queries) -> None:
        density = create_density(name).fit(*fit_data)
        q = queries.clone()
        q[3, 1] = bad
        with pytest.raises(DensituneError):
            density.score_samples(q)

    def test_wrong_feature_dimension_raises(self, name, fit_data, queries) -> None:
        density = create_density(name).fit(*fit_data)
        with pytest.raises(DensituneError, match="dimension"):
            density.score_samples(queries[:, :-1])
        with pytest.raises(DensituneError, match="shape"):
            density.score_samples(queries[0])

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_features_are_refused_by_fit(self, name, bad, fit_data) -> None:
        z, y = fit_data
        z_bad = z.clone()
        z_bad[3, 1] = bad
        with pytest.raises(DensituneError, match="NaN"):
            create_density(name).fit(z_bad, y)

    def test_gradient_matches_finite_differences(self, name, fit_data, queries) -> None:
        density = create_density(name, chunk_size=5).fit(fit_data[0].double(), fit_data[1])
        assert torch.autograd.gradcheck(density.score_samples, (queries[:6].double().clone().requires_grad_(True),))

    def test_fit_does_not_keep_the_autograd_graph(self, name, fit_data, queries) -> None:
        z, y = fit_data
        density = create_density(name).fit(z.clone().requires_grad_(True), y)
        assert not density.score_samples(queries).requires_grad


# ---------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", **MODEL_KW).eval()


@pytest.fixture(scope="module")
def score_env() -> dict:
    """Two untrained CNNs, digits inputs and a gmm_sum density fitted on model 0's features."""
    x_train, y_train = load_split("digits", "train", limit=300).tensors
    x_test, _ = load_split("digits", "test").tensors
    models = [_model(0), _model(1)]
    with torch.no_grad():
        z_train = models[0].features(x_train)
    return {
        "models": models,
        "z_train": z_train,
        "y_train": y_train,
        "density": create_density("gmm_sum").fit(z_train, y_train),
        "x": x_test[:24],
    }


def _own_density(name: str, env: dict, model):
    """The fitted model of a score that has its own (knn, rmd, vim), fitted on model 0's training features."""
    d = create_density(name)
    if d.needs_head:
        d.set_head(model.head.weight, model.head.bias)
    return d.fit(env["z_train"], env["y_train"])


def _build(name: str, env: dict, density=None):
    cls = score_class(name)
    models = env["models"][: 2 if cls.ensemble else 1]
    if cls.density_name is not None:
        density = _own_density(cls.density_name, env, models[0])
    elif cls.uses_density:
        density = density or env["density"]
    return create_score(name, models, density if cls.uses_density else None), models


def _eps_values(name: str) -> list[float]:
    return [0.01] if score_class(name).needs_ip else [0.0, 0.01]


@pytest.mark.parametrize("name", SCORE_NAMES)
class TestScoreContract:
    def test_evaluate_shape_and_finite(self, name, score_env) -> None:
        score, _ = _build(name, score_env)
        x = score_env["x"]
        for eps in _eps_values(name):
            out = score.evaluate(x, eps)
            assert out.shape == (x.shape[0],)
            assert torch.isfinite(out).all()
            assert not out.requires_grad

    def test_from_features_equals_clean_evaluate(self, name, score_env) -> None:
        score, models = _build(name, score_env)
        x = score_env["x"]
        with torch.no_grad():
            feats = [m.features_and_logits(x) for m in models]
        fast = score.from_features(feats)
        if fast is None:
            assert score_class(name).needs_ip  # only a score undefined at eps = 0 may lack the fast path
            return
        assert fast.shape == (x.shape[0],)
        torch.testing.assert_close(fast, score.evaluate(x, 0.0), rtol=1e-6, atol=1e-6)

    def test_deterministic(self, name, score_env) -> None:
        x = score_env["x"]
        for eps in _eps_values(name):
            a = _build(name, score_env)[0].evaluate(x, eps)
            b = _build(name, score_env)[0].evaluate(x, eps)
            assert torch.equal(a, b)

    def test_does_not_modify_inputs_or_models(self, name, score_env) -> None:
        score, models = _build(name, score_env)
        x = score_env["x"].clone()
        x_before = x.clone()
        params_before = [p.detach().clone() for m in models for p in m.parameters()]
        score.evaluate(x, 0.01)
        assert torch.equal(x, x_before) and not x.requires_grad
        params_after = [p.detach() for m in models for p in m.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
        assert all(p.grad is None for m in models for p in m.parameters())

    def test_small_ip_step_raises_the_score_on_average(self, name, score_env) -> None:
        # Every score's perturbation climbs its own gradient (diff: the density's), so one small signed step
        # raises the mean reported score (diff: a positive mean gain).
        score, _ = _build(name, score_env)
        x = score_env["x"]
        after = score.evaluate(x, 1e-3)
        if score_class(name).needs_ip:
            assert after.mean() > 0
        else:
            assert after.mean() > score.evaluate(x, 0.0).mean()

    def test_needs_ip_scores_reject_eps_zero(self, name, score_env) -> None:
        score, _ = _build(name, score_env)
        if score_class(name).needs_ip:
            with pytest.raises(ConfigError):
                score.evaluate(score_env["x"], 0.0)
        else:
            assert score.evaluate(score_env["x"], 0.0).shape == (score_env["x"].shape[0],)

    def test_density_score_without_density_raises(self, name, score_env) -> None:
        cls = score_class(name)
        models = score_env["models"][: 2 if cls.ensemble else 1]
        if cls.uses_density:
            with pytest.raises(ConfigError):
                create_score(name, models, None)
        else:
            create_score(name, models, None)  # fine without one

    def test_model_count_checked(self, name, score_env) -> None:
        models = score_env["models"]
        density = score_env["density"]
        with pytest.raises(ConfigError):
            create_score(name, [], density)
        if score_class(name).ensemble:
            create_score(name, models[:1], density)
            create_score(name, models, density)
        else:
            with pytest.raises(ConfigError):
                create_score(name, models, density)


@pytest.mark.parametrize("density_name", DENSITY_NAMES)
@pytest.mark.parametrize("name", [n for n in SCORE_NAMES if score_class(n).uses_density and not score_class(n).density_name])
def test_density_scores_work_with_every_density(name, density_name, score_env) -> None:
    density = create_density(density_name).fit(score_env["z_train"], score_env["y_train"])
    score, models = _build(name, score_env, density)
    x = score_env["x"]
    for eps in _eps_values(name):
        out = score.evaluate(x, eps)
        assert out.shape == (x.shape[0],) and torch.isfinite(out).all()
    fast = score.from_features([m.features_and_logits(x) for m in models])
    if fast is not None:
        with torch.no_grad():
            ref = density.score_samples(models[0].features(x))
        torch.testing.assert_close(fast.detach(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(score.evaluate(x, 0.0), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the clone contract (scikit-learn's): over every registered density and score, in one test
# ---------------------------------------------------------------------------------------------------------

ESTIMATORS = [("density", n) for n in DENSITY_NAMES] + [("score", n) for n in SCORE_NAMES]


@pytest.mark.parametrize("kind, name", ESTIMATORS, ids=[f"{k}-{n}" for k, n in ESTIMATORS])
def test_create_from_get_params_rebuilds_an_equal_unfitted_estimator(kind, name, fit_data, score_env) -> None:
    """``create(name, **est.get_params())`` gives an equal estimator, unfitted; fitted state ends in ``_``;
    :meth:`Density.describe` (what fills the result rows) of the clone equals the original's parameters."""
    if kind == "density":
        unfitted = create_density(name, chunk_size=7)  # a non-default value must survive the round trip
        est = create_density(name, chunk_size=7).fit(*fit_data)
        clone = create_density(name, **est.get_params())
        assert type(clone) is type(est) and clone.get_params() == est.get_params() and clone.get_params()["chunk_size"] == 7
        assert not clone.is_fitted() and est.is_fitted()
        learned = set(vars(est)) - set(vars(unfitted))
        assert learned and all(k.endswith("_") for k in learned)  # fit sets only trailing-underscore attributes
        assert set(est.state_dict()["fitted"]) == learned
        assert clone.describe() == {**est.describe(), "density_fit": None}
    else:
        est, models = _build(name, score_env)
        clone = create_score(name, models, est.density, **est.get_params())
        assert type(clone) is type(est) and clone.get_params() == est.get_params()
        assert clone.models == est.models and clone.density is est.density
        x = score_env["x"]
        torch.testing.assert_close(clone.evaluate(x, 0.01), est.evaluate(x, 0.01))
