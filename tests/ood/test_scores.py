"""Tests for search/scores.py: every score against an independent reference, and the sign convention.

References used here, all computed outside the score classes:
- GradNorm: per-sample autograd of the official loss (Huang et al. 2021, all-ones target, T = 1, batch size 1).
- diff: :func:`densitune.search.ood.perturb.perturb` + the density's ``score_samples`` called directly.
- msp / entropy / ensembles: ``scipy.special.softmax`` in float64 numpy on the models' logits.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.special import softmax, xlogy

from densitune.errors import ConfigError
from densitune.search.ood.densities import create_density
from densitune.search.ood.metrics import auroc
from densitune.search.ood.perturb import perturb
from densitune.search.ood.scores import create_score, gradnorm_from_features
from densitune.trainables.data import load_split
from densitune.trainables.nets.backbones import create_model
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit

MODEL_KW = dict(in_channels=1, image_size=8, num_classes=10, feature_dim=8, mean=(0.3,), std=(0.37,))
K = 10


def _untrained(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", **MODEL_KW).eval()


def _trained(seed: int) -> torch.nn.Module:
    *_, last = fit(TrainConfig(backbone="cnn", feature_dim=8, epochs=2, seed=seed), device=torch.device("cpu"))
    return last.model.eval()


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    x_train, y_train = load_split("digits", "train").tensors
    x_test, _ = load_split("digits", "test").tensors
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(x_test.shape, generator=g)  # uniform noise in [0, 1]: far OOD
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "noise": noise}


@pytest.fixture(scope="module")
def models() -> list[torch.nn.Module]:
    """Three tiny CNNs (D = 8) trained 2 epochs on digits with seeds 0, 1, 2."""
    return [_trained(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def density(models, data):
    """gmm_sum fitted on model 0's features of the digits training split."""
    with torch.no_grad():
        z = models[0].features(data["x_train"])
    return create_density("gmm_sum").fit(z, data["y_train"])


def _np_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).double().numpy()


# ---------------------------------------------------------------------------------------------------------
# GradNorm
# ---------------------------------------------------------------------------------------------------------


def _gradnorm_autograd(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official GradNorm loop: one input at a time, loss = sum_k -log softmax_k, L1 norm of dL/dW."""
    out = []
    for i in range(x.shape[0]):
        with torch.no_grad():
            z_i = model.features(x[i : i + 1])
        logits = model.head(z_i)
        loss = (-torch.log_softmax(logits, dim=1)).sum()
        (grad,) = torch.autograd.grad(loss, model.head.weight)
        assert grad.shape == (K, 8)
        out.append(grad.abs().sum())
    return torch.stack(out)


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_gradnorm_closed_form_equals_per_sample_autograd(which, models, data) -> None:
    # Everything in float64 (a double copy of the model), so the only difference is the closed form itself;
    # tolerance is relative (1e-5) because the score scales with ||z||_1 (values here are O(1)-O(100)).
    model = copy.deepcopy(_untrained(0) if which == "untrained" else models[0]).double()
    x = torch.cat([data["x_test"][:12], data["noise"][:4]]).double()
    ref = _gradnorm_autograd(model, x)
    assert ref.dtype == torch.float64 and (ref > 0).all()

    score = create_score("gradnorm", [model])
    with torch.no_grad():
        z, logits = model.features_and_logits(x)
    torch.testing.assert_close(score(x), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(score.evaluate(x, 0.0), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(score.from_features([(z, logits)]), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(gradnorm_from_features(z, logits), ref, rtol=1e-5, atol=0.0)


def test_gradnorm_analytic_values() -> None:
    z = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, -1.0], [2.0, 0.0, 0.0]])
    # row 0: K = 2 and p = (3/4, 1/4): sum |2 p - 1| = 1/2 + 1/2 = 1, ||z||_1 = 6
    # row 1: uniform p = (1/2, 1/2): every |K p - 1| = 0
    # row 2: p = (1/4, 3/4): again 1, ||z||_1 = 2
    logits = torch.tensor([[math.log(3.0), 0.0], [1.7, 1.7], [0.0, math.log(3.0)]])
    out = gradnorm_from_features(z, logits)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([6.0, 0.0, 2.0], dtype=torch.float64), rtol=1e-6, atol=1e-12)
    # a confident prediction over K classes: |K - 1| + (K - 1) |0 - 1| = 2 (K - 1)
    confident = torch.zeros(1, K)
    confident[0, 3] = 200.0
    torch.testing.assert_close(
        gradnorm_from_features(torch.ones(1, 3), confident), torch.tensor([3.0 * 2 * (K - 1)], dtype=torch.float64)
    )


# ---------------------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.002, 0.02])
def test_diff_equals_difference_of_density_scores(eps, models, density, data) -> None:
    model = models[0]
    x = torch.cat([data["x_test"][:48], data["noise"][:16]])

    def density_score(inp: torch.Tensor) -> torch.Tensor:
        return density.score_samples(model.features(inp))

    x_tilde = perturb(x, density_score, eps)
    assert not torch.equal(x_tilde, x)
    with torch.no_grad():
        ref = density_score(x_tilde) - density_score(x)

    diff = create_score("diff", [model], density)
    out = diff.evaluate(x, eps)
    assert out.shape == (64,) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # and it is the density score at x~ minus the density score at x
    dens = create_score("density", [model], density)
    torch.testing.assert_close(out, dens.evaluate(x, eps) - dens.evaluate(x, 0.0), rtol=1e-10, atol=1e-10)


def test_diff_needs_positive_eps(models, density, data) -> None:
    diff = create_score("diff", [models[0]], density)
    x = data["x_test"][:4]
    with pytest.raises(ConfigError):
        diff.evaluate(x, 0.0)
    with pytest.raises(ConfigError):
        diff.evaluate(x, 0)
    with pytest.raises(ConfigError):
        diff.evaluate(x, -0.01)
    assert diff.needs_ip and diff.uses_density
    # no clean-feature fast path: the score is undefined without the perturbed input
    with torch.no_grad():
        assert diff.from_features([models[0].features_and_logits(x)]) is None


# ---------------------------------------------------------------------------------------------------------
# msp / entropy / ensembles
# ---------------------------------------------------------------------------------------------------------


def test_msp_and_entropy_equal_softmax_reference(models, data) -> None:
    model = models[0]
    x = torch.cat([data["x_test"][:64], data["noise"][:16]])
    p = softmax(_np_logits(model, x), axis=1)
    ref_msp = torch.from_numpy(p.max(axis=1))
    ref_negent = torch.from_numpy(xlogy(p, p).sum(axis=1))  # -H(p) = sum p log p
    with torch.no_grad():
        feats = [model.features_and_logits(x)]
    for name, ref in [("msp", ref_msp), ("entropy", ref_negent)]:
        score = create_score(name, [model])
        torch.testing.assert_close(score.evaluate(x, 0.0), ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(score.from_features(feats), ref, rtol=1e-9, atol=1e-12)
    # the reference is not degenerate: probabilities spread between 1/K and 1
    assert ref_msp.min() < 0.6 and ref_msp.max() > 0.9


def test_msp_and_entropy_analytic_at_uniform_logits() -> None:
    z = torch.randn(3, 8)
    logits = torch.full((3, K), 0.25)
    msp = create_score("msp", [_untrained(0)]).from_features([(z, logits)])
    ent = create_score("entropy", [_untrained(0)]).from_features([(z, logits)])
    torch.testing.assert_close(msp, torch.full((3,), 1.0 / K, dtype=torch.float64))
    torch.testing.assert_close(ent, torch.full((3,), -math.log(K), dtype=torch.float64))


def test_ensembles_equal_mean_softmax_reference(models, data) -> None:
    x = torch.cat([data["x_test"][:64], data["noise"][:16]])
    probs = [softmax(_np_logits(m, x), axis=1) for m in models]
    mean_p = np.mean(probs, axis=0)
    ref_msp = torch.from_numpy(mean_p.max(axis=1))
    ref_negent = torch.from_numpy(xlogy(mean_p, mean_p).sum(axis=1))
    with torch.no_grad():
        feats = [m.features_and_logits(x) for m in models]
    for name, ref in [("ensemble_msp", ref_msp), ("ensemble_entropy", ref_negent)]:
        score = create_score(name, models)
        torch.testing.assert_close(score.evaluate(x, 0.0), ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(score.from_features(feats), ref, rtol=1e-9, atol=1e-12)
    # the three seeds disagree, so the mean is not any single model's softmax
    for p in probs:
        assert np.abs(p.max(axis=1) - mean_p.max(axis=1)).max() > 1e-2


@pytest.mark.parametrize("single, ensemble", [("msp", "ensemble_msp"), ("entropy", "ensemble_entropy")])
def test_ensemble_of_identical_models_equals_single_model(single, ensemble, models, data) -> None:
    model = models[1]
    x = torch.cat([data["x_test"][:32], data["noise"][:8]])
    ref = create_score(single, [model]).evaluate(x, 0.0)
    for members in ([model], [model, model, model], [model, copy.deepcopy(model)]):
        score = create_score(ensemble, members)
        torch.testing.assert_close(score.evaluate(x, 0.0), ref, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            feats = [m.features_and_logits(x) for m in members]
        torch.testing.assert_close(score.from_features(feats), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# input perturbation and the sign convention
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.002, 0.01])
def test_ip_raises_the_density_score_of_id_inputs(eps, models, density, data) -> None:
    score = create_score("density", [models[0]], density)
    x = data["x_test"]
    before = score.evaluate(x, 0.0)
    after = score.evaluate(x, eps)
    assert after.mean() > before.mean()
    # one small step up the gradient raises (nearly) every input's log-density
    assert (after > before).double().mean() >= 0.9
    # diff reports exactly that gain
    diff = create_score("diff", [models[0]], density).evaluate(x, eps)
    torch.testing.assert_close(diff, after - before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["density", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy"])
def test_scores_rank_digits_above_uniform_noise(name, models, density, data) -> None:
    # Higher = more in-distribution: a reversed sign would give AUROC well below 0.5. Measured on this
    # model (seed 0, 2 epochs): density 0.76, msp 0.92, entropy 0.92, gradnorm 0.93, ensembles 0.98;
    # 0.6 is ~5 null standard deviations above chance for 359 vs 359 samples.
    members = models if name.startswith("ensemble") else models[:1]
    score = create_score(name, members, density if name == "density" else None)
    s_id = score.evaluate(data["x_test"], 0.0)
    s_ood = score.evaluate(data["noise"], 0.0)
    assert auroc(s_id, s_ood) > 0.6
    assert s_id.median() > s_ood.median()
