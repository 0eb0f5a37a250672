"""The field's baselines (energy, rmd, knn, vim) against pytorch-ood 0.4.0, per sample, on the same features.

pytorch-ood's detectors return higher = more OOD; ours higher = more in-distribution, so each comparison flips
the sign. One tiny CNN (D = 16) trained two epochs on the embedded digits gives the features, logits and head.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorch_ood")
from pytorch_ood.detector import KNN, RMD, EnergyBased, ViM  # noqa: E402

from densitune.errors import ConfigError  # noqa: E402
from densitune.search.ood.densities import create_density, density_from_state  # noqa: E402
from densitune.search.ood.densities.baselines import vim_default_dim  # noqa: E402
from densitune.search.ood.metrics import auroc  # noqa: E402
from densitune.search.ood.scores import create_score  # noqa: E402
from densitune.search.spec import SearchSpec  # noqa: E402
from densitune.trainables.data import load_split  # noqa: E402
from densitune.trainables.train.config import TrainConfig  # noqa: E402
from densitune.trainables.train.loop import fit  # noqa: E402

RTOL = 1e-6


@pytest.fixture(scope="module")
def setup() -> dict:
    *_, last = fit(TrainConfig(backbone="cnn", feature_dim=16, epochs=2, seed=0), device=torch.device("cpu"))
    model = last.model.eval()
    x_train, y_train = load_split("digits", "train").tensors
    x_test, _ = load_split("digits", "test").tensors
    noise = torch.rand(x_test.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_train, l_train = model.features_and_logits(x_train)
        z_test, l_test = model.features_and_logits(torch.cat([x_test, noise]))
    return {"model": model, "x": torch.cat([x_test, noise]), "n_id": len(x_test), "z_train": z_train,
            "y_train": y_train, "z": z_test, "logits": l_test}


def _fitted_score(name: str, s: dict, **params):
    d = create_density(name, **params)
    if d.needs_head:
        d.set_head(s["model"].head.weight, s["model"].head.bias)
    d.fit(s["z_train"], s["y_train"])
    return create_score(name, [s["model"]], d)


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=RTOL, atol=0.0)


def test_energy_equals_pytorch_ood(setup) -> None:
    score = create_score("energy", [setup["model"]])
    ours = score.from_features([(setup["z"], setup["logits"])])
    theirs = EnergyBased(None).predict_logits(setup["logits"].double())
    _close(ours, -theirs)
    _close(score(setup["x"]), ours)  # the differentiable path on inputs gives the same numbers


@pytest.mark.process
@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_equals_pytorch_ood(k, setup) -> None:
    score = _fitted_score("knn", setup, k=k, chunk_size=97)  # odd chunks: the running top-k crosses blocks
    ours = score.from_features([(setup["z"], setup["logits"])])
    det = KNN(None, k=k).fit_features(setup["z_train"].double(), setup["y_train"])
    _close(ours, -det.predict_features(setup["z"].double()))


def test_rmd_equals_pytorch_ood_up_to_its_scale(setup) -> None:
    """pytorch-ood 0.4.0 divides neither scatter matrix by N: its score is ours / N with ours' reg = 1e-6 / N."""
    n = len(setup["y_train"])
    score = _fitted_score("rmd", setup, reg_covar=1e-6 / n)
    ours = score.from_features([(setup["z"], setup["logits"])])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its buffers are created with the default dtype
    try:
        det = RMD(None).fit_features(setup["z_train"].double(), setup["y_train"])
        theirs = det.predict_features(setup["z"].double())
    finally:
        torch.set_default_dtype(default)
    _close(ours, -n * theirs)


def test_vim_equals_pytorch_ood(setup, monkeypatch) -> None:
    """pytorch-ood's ViM casts everything with ``.float()``; run with that cast meaning float64 (its algorithm,
    our precision) it equals ours per sample to 1e-6 relative. Its own float32 run is checked too, against
    the float32 rounding it carries (~4e-6 of the scores' scale on these features, where scores cross 0)."""
    model = setup["model"]
    d = 16 // 2
    score = _fitted_score("vim", setup, dim=d)
    ours = score.from_features([(setup["z"], setup["logits"])])

    def theirs() -> tuple[torch.Tensor, float]:
        det = ViM(None, d=d, w=model.head.weight, b=model.head.bias).fit_features(setup["z_train"], setup["y_train"])
        return det.predict_features(setup["z"]).double(), float(det.alpha)

    s32, alpha32 = theirs()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "float", lambda self, *a, **k: self.to(torch.float64))
        s64, alpha64 = theirs()
    _close(ours, -s64)
    assert score.density.alpha_ == pytest.approx(alpha64, rel=RTOL)
    assert score.density.alpha_ == pytest.approx(alpha32, rel=1e-5)
    torch.testing.assert_close(ours, -s32, rtol=0.0, atol=1e-5 * float(ours.abs().max()))
    assert vim_default_dim(16) == d and vim_default_dim(2048) == 1000 and vim_default_dim(1024) == 512


@pytest.mark.parametrize("name", ["energy", "rmd", "knn", "vim"])
def test_input_path_differentiable_and_ranks_noise_low(name, setup) -> None:
    score = _fitted_score(name, setup) if name != "energy" else create_score(name, [setup["model"]])
    x = setup["x"][:64].clone().requires_grad_(True)
    s = score(x)
    assert s.shape == (64,) and s.dtype == torch.float64
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    fast = score.from_features([(setup["z"], setup["logits"])])
    assert auroc(fast[: setup["n_id"]], fast[setup["n_id"]:]) > 0.5  # higher = more in-distribution
    # ip: ε > 0 goes through evaluate and stays finite
    assert torch.isfinite(score.evaluate(setup["x"][:8], 0.01)).all()


@pytest.mark.parametrize("name", ["rmd", "knn", "vim"])
def test_fitted_state_round_trips(name, setup) -> None:
    score = _fitted_score(name, setup)
    again = density_from_state(score.density.state_dict())
    assert again.get_params() == score.density.get_params()
    _close(again.score_samples(setup["z"]), score.density.score_samples(setup["z"]))


def test_fitted_scores_are_not_densities(setup) -> None:
    with pytest.raises(ConfigError, match="not a density"):
        SearchSpec(experiment="x", val_ood="digits-blend", test_ood=("noise-uniform",), densities=("knn",))
    with pytest.raises(ConfigError, match="needs a fitted 'knn'"):
        create_score("knn", [setup["model"]], create_density("gmm_sum").fit(setup["z_train"], setup["y_train"]))
    with pytest.raises(ConfigError):
        create_density("knn", k=0)


def test_searchable_in_grid_and_tpe() -> None:
    """Grid: one point per k; TPE (a real Optuna study on the define-by-run space): k drawn from its list."""
    import optuna

    from densitune.search.models import ModelGroup
    from densitune.search.space import DefineByRun, grid_points, params_from_config

    group = ModelGroup("cnn-D8-ce", "cnn", 8, "ce", 0.0, False, "digits", 0, (0,), ("ckpt",))
    spec = SearchSpec(experiment="x", val_ood="digits-blend", test_ood=("noise-uniform",), scores=("energy", "rmd", "knn", "vim"),
                      eps_grid=(0.0, 0.01), density_params={"knn": {"k": [5, 50]}, "vim": {"dim": [2, 4]}})
    points = grid_points(spec, [group])
    assert len(points) == (1 + 1 + 2 + 2) * 2
    assert {(p.score, p.density.name, p.density.params_json()) for p in points if p.score == "knn"} == {
        ("knn", "knn", '{"k": 5}'), ("knn", "knn", '{"k": 50}')}
    assert {p.density.name for p in points if p.score == "energy"} == {""}
    space = DefineByRun(spec, [group])
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    drawn = set()

    def objective(trial) -> float:
        space(trial)
        p = params_from_config(dict(trial.params))
        drawn.add(p.score)
        if p.score in ("knn", "vim", "rmd"):
            assert p.density.name == p.score
        if p.score == "knn":
            assert p.density.params["k"] in (5, 50)
        if p.score == "energy":
            assert p.density.name == "" and p.density.params_json() == "{}"
        return 0.5

    study.optimize(objective, n_trials=40)
    assert drawn == {"energy", "rmd", "knn", "vim"}
