"""Tests for search/perturb.py: exact no-op at eps = 0, exact eps-sized steps, density goes up, no side effects."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from densitune.errors import ConfigError
from densitune.search.ood.densities import create_density
from densitune.search.ood.perturb import perturb


class _TanhFeatures(nn.Module):
    """A small fixed feature map f(x) = tanh(x W^T + b): (N, 4) -> (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


@pytest.fixture(scope="module")
def setup() -> tuple[_TanhFeatures, object, torch.Tensor]:
    """Feature map, gmm_sum density fitted on its features of two Gaussian classes, and held-out ID inputs."""
    g = torch.Generator().manual_seed(1)
    model = _TanhFeatures().eval()
    x_train = torch.cat([torch.randn(200, 4, generator=g) * 0.5 - 0.5, torch.randn(200, 4, generator=g) * 0.5 + 0.5])
    y_train = torch.cat([torch.zeros(200, dtype=torch.int64), torch.ones(200, dtype=torch.int64)])
    with torch.no_grad():
        density = create_density("gmm_sum").fit(model(x_train), y_train)
    # held-out ID inputs on a dyadic grid (multiples of 1/64, |x| < 2) so x + eps and its difference are exact
    x_id = torch.round(torch.cat([torch.randn(50, 4, generator=g) * 0.5 - 0.5, torch.randn(50, 4, generator=g) * 0.5 + 0.5]) * 64) / 64
    return model, density, x_id


def _score_fn(model: nn.Module, density) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: density.score_samples(model(x))


def test_eps_zero_returns_the_same_tensor(setup) -> None:
    model, density, x = setup
    calls = []

    def score_fn(inp: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return density.score_samples(model(inp))

    out = perturb(x, score_fn, 0.0)
    assert out is x and torch.equal(out, x)
    assert calls == []  # no gradient computed
    assert perturb(x, score_fn, 0) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_element_moves_by_exactly_eps(setup, dtype: torch.dtype) -> None:
    model, density, x = setup
    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype)
    eps = 2.0**-6
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(density.score_samples(model(leaf)).sum(), leaf)
    assert (grad != 0).all()  # precondition: no element with sign 0
    out = perturb(x, _score_fn(model, density), eps)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal((out - x).abs(), torch.full_like(x, eps))
    assert torch.equal(torch.sign(out - x), torch.sign(grad))  # towards higher density, no clamping


def test_perturbation_raises_mean_log_density_of_id_inputs(setup) -> None:
    model, density, x = setup
    with torch.no_grad():
        before = density.score_samples(model(x))
    for eps in (1e-3, 1e-2):
        x_t = perturb(x, _score_fn(model, density), eps)
        with torch.no_grad():
            after = density.score_samples(model(x_t))
        assert after.mean() > before.mean()
        # a small signed-gradient step raises every sample's score (first order: eps * ||grad||_1 > 0)
        if eps == 1e-3:
            assert (after > before).all()


def test_result_is_detached_and_leaves_no_grads(setup) -> None:
    model, density, x = setup
    for p in model.parameters():
        assert p.grad is None
    x_req = x.clone().requires_grad_(True)
    out = perturb(x_req, _score_fn(model, density), 0.01)
    assert not out.requires_grad and out.grad_fn is None
    assert x_req.requires_grad and x_req.grad is None  # untouched
    assert all(p.grad is None for p in model.parameters())
    # also with a plain input, and under an outer no_grad
    with torch.no_grad():
        out2 = perturb(x, _score_fn(model, density), 0.01)
    assert not x.requires_grad and torch.equal(out, out2)
    assert all(p.grad is None for p in model.parameters())


def test_per_sample_independence(setup) -> None:
    model, density, x = setup
    whole = perturb(x, _score_fn(model, density), 0.01)
    parts = torch.cat([perturb(x[:30], _score_fn(model, density), 0.01), perturb(x[30:], _score_fn(model, density), 0.01)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("eps", [-1e-3, -1.0, float("nan"), float("inf")])
def test_bad_eps_is_config_error(setup, eps: float) -> None:
    model, density, x = setup
    with pytest.raises(ConfigError):
        perturb(x, _score_fn(model, density), eps)


def test_score_fn_with_wrong_shape_or_no_gradient_is_rejected(setup) -> None:
    model, density, x = setup
    with pytest.raises(ValueError, match="scores"):
        perturb(x, lambda inp: density.score_samples(model(inp)).unsqueeze(1), 0.01)
    with pytest.raises(ValueError, match="differentiabl"):
        perturb(x, lambda inp: density.score_samples(model(inp).detach()), 0.01)
