"""Tests for densitune.trainables.nets.backbones and densitune.trainables.nets.spectral: shapes, determinism, soft spectral normalisation
(Mukhoti et al., 2021), state_dict round trips and error messages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densitune.errors import ConfigError, UnknownNameError
from densitune.trainables.nets.backbones import (
    BACKBONES,
    FeatureNet,
    Normalize,
    SpectralConfig,
    backbone_names,
    create_model,
    vit_patch_size,
)
from densitune.trainables.nets.spectral import (
    SoftSpectralNorm,
    apply_spectral_norm,
    effective_weight,
    raw_weight,
    spectral_layers,
    spectral_norm_of,
)

N, D, C = 2, 16, 10
# Each entry: (in_channels, image_size). 8x8 is sklearn digits, 28x28 MNIST-like, 32x32 CIFAR-like.
SIZES = [(3, 32), (1, 28), (1, 8)]
BODY_DIMS = {"cnn": 128, "resnet18": 512, "resnet50": 2048, "vgg16": 512, "wrn28_10": 640, "wrn16_4": 256, "vit": 256}


def _make(name: str, in_channels: int = 3, image_size: int = 32, spectral: SpectralConfig | None = None,
          seed: int = 0, feature_dim: int = D) -> FeatureNet:
    torch.manual_seed(seed)
    return create_model(
        name,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=C,
        feature_dim=feature_dim,
        mean=(0.5,) * in_channels,
        std=(0.25,) * in_channels,
        spectral=spectral,
    )


def _sgd_steps(model: nn.Module, in_channels: int, image_size: int, steps: int, lr: float = 0.1,
               batch: int = 16) -> None:
    """A few SGD steps of cross-entropy on random data, in train mode."""
    g = torch.Generator().manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = torch.rand(batch, in_channels, image_size, image_size, generator=g)
        y = torch.randint(0, C, (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------------------------------------ registry and shapes


def test_registry_lists_the_required_backbones() -> None:
    assert set(BODY_DIMS) <= set(backbone_names())
    assert backbone_names() == sorted(backbone_names())


@pytest.mark.parametrize("in_channels,image_size", SIZES)
@pytest.mark.parametrize("name", backbone_names())
def test_shapes(name: str, in_channels: int, image_size: int) -> None:
    model = _make(name, in_channels, image_size).eval()
    x = torch.rand(N, in_channels, image_size, image_size)
    with torch.no_grad():
        z, logits = model.features_and_logits(x)
    assert z.shape == (N, D)
    assert logits.shape == (N, C)
    assert torch.isfinite(z).all() and torch.isfinite(logits).all()
    assert model.feature_dim == D and model.num_classes == C
    assert (model.projection.in_features, model.projection.out_features) == (model.body_dim, D)
    assert model.body_dim == BODY_DIMS.get(name, model.body_dim)


def test_forward_is_head_of_features_and_gradients_reach_input() -> None:
    model = _make("cnn", 1, 8).eval()
    x = torch.rand(N, 1, 8, 8, requires_grad=True)
    z, logits = model.features_and_logits(x)
    torch.testing.assert_close(model.features(x), z, rtol=0, atol=0)
    torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, z @ model.head.weight.T + model.head.bias, rtol=0, atol=1e-6)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_normalization_is_inside_the_model() -> None:
    model = _make("cnn", 3, 32)
    assert isinstance(next(iter(model.children())), Normalize)
    sd = model.state_dict()
    assert torch.equal(sd["normalize.mean"].flatten(), torch.full((3,), 0.5))
    assert torch.equal(sd["normalize.std"].flatten(), torch.full((3,), 0.25))
    x = torch.rand(N, 3, 4, 4)
    torch.testing.assert_close(model.normalize(x), (x - 0.5) / 0.25)
    # Not a parameter: an optimiser never moves the normalisation.
    assert all("normalize" not in n for n, _ in model.named_parameters())


def test_head_is_plain_linear_with_bias() -> None:
    model = _make("cnn", spectral=SpectralConfig())
    assert type(model.head) is nn.Linear
    assert model.head.bias is not None
    assert model.head.weight.shape == (C, D)


@pytest.mark.parametrize("name", ["cnn", "vit", "wrn16_4"])
@pytest.mark.parametrize("spectral", [None, SpectralConfig()])
def test_same_seed_same_init(name: str, spectral: SpectralConfig | None) -> None:
    a, b = _make(name, seed=7, spectral=spectral), _make(name, seed=7, spectral=spectral)
    c = _make(name, seed=8, spectral=spectral)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_vit_patch_size() -> None:
    assert [vit_patch_size(s) for s in (32, 28, 8, 14, 7)] == [4, 4, 4, 2, 1]
    assert _make("vit", 1, 28).body.patch_size == 4


def test_vgg_keeps_pools_while_the_map_is_larger_than_one_pixel() -> None:
    def pools(size: int) -> int:
        body, _ = BACKBONES.get("vgg16")(1, size, None)
        return sum(isinstance(m, nn.MaxPool2d) for m in body.modules())

    assert (pools(32), pools(28), pools(8)) == (5, 4, 3)


def test_resnet_small_input_stem() -> None:
    body = _make("resnet18", 1, 8).body
    assert body.conv1.in_channels == 1
    assert (body.conv1.kernel_size, body.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(body.maxpool, nn.Identity) and isinstance(body.fc, nn.Identity)


# ------------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [0, -3])
def test_nonpositive_feature_dim_is_a_config_error(bad: int) -> None:
    with pytest.raises(ConfigError, match="feature_dim"):
        _make("cnn", feature_dim=bad)


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        _make("resnet1000")
    message = str(info.value)
    assert "resnet1000" in message
    assert all(name in message for name in backbone_names())
    assert "\n" not in message


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError):
        create_model("cnn", in_channels=3, image_size=32, num_classes=C, feature_dim=D, mean=(0.5,), std=(0.25,))
    with pytest.raises(ConfigError):
        create_model("cnn", in_channels=1, image_size=8, num_classes=C, feature_dim=D, mean=(0.5,), std=(0.0,))
    with pytest.raises(ConfigError):
        SpectralConfig(coeff=0.0)
    with pytest.raises(ConfigError):
        SpectralConfig(n_power_iterations=0)


# ---------------------------------------------------------------------------------------------------------- spectral


def test_spectral_covers_every_conv_and_linear_of_body_and_projection_but_not_head() -> None:
    model = _make("cnn", spectral=SpectralConfig())
    names = {n for n, _ in spectral_layers(model)}
    expected = {f"body.{n}" for n, m in model.body.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(expected) == 5  # cnn at 32x32: 5 convs (its receptive field covers the input, cnn_plan)
    assert names == expected | {"projection"}
    assert "head" not in names
    assert spectral_layers(_make("cnn")) == []


def test_spectral_on_vit_includes_attention_projections() -> None:
    model = _make("vit", spectral=SpectralConfig())
    normed = dict(spectral_layers(model))
    for name, m in model.body.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)):
            assert f"body.{name}" in normed
    mha = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert effective_weight(mha).shape == raw_weight(mha).shape == (3 * 256, 256)


def test_power_iteration_estimate_matches_svd_after_warmup() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(20.0)
    apply_spectral_norm(lin, SpectralConfig(coeff=3.0))
    norm = lin.parametrizations.weight[0]
    assert isinstance(norm, SoftSpectralNorm)
    exact = torch.linalg.matrix_norm(raw_weight(lin).detach(), ord=2)
    torch.testing.assert_close(norm.sigma(raw_weight(lin)).detach(), exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(spectral_norm_of(effective_weight(lin)), torch.tensor(3.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("coeff", [0.5, 1.0])
def test_spectral_bound_holds_after_training(coeff: float) -> None:
    model = _make("cnn", 1, 8, spectral=SpectralConfig(coeff=coeff))
    _sgd_steps(model, 1, 8, steps=5)
    model.eval()
    layers = spectral_layers(model)
    assert len(layers) == 4
    binding = 0
    for name, layer in layers:
        w = effective_weight(layer)
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        assert sigma <= coeff * 1.01, (name, sigma)
        # The eval-mode forward uses exactly this weight.
        assert torch.equal(layer.weight, w)
        binding += spectral_norm_of(raw_weight(layer)).item() > coeff
    assert binding >= 2  # the bound was actually exercised


def test_layer_below_coeff_is_left_unchanged() -> None:
    model = _make("cnn", 1, 8, spectral=SpectralConfig(coeff=3.0))
    _sgd_steps(model, 1, 8, steps=3)
    model.eval()
    below = [(n, m) for n, m in spectral_layers(model) if spectral_norm_of(raw_weight(m)).item() < 3.0 * 0.99]
    assert below, "expected small random-init layers to be below coeff 3"
    for _, layer in below:
        assert torch.equal(effective_weight(layer), raw_weight(layer).detach())


def test_soft_normalisation_scales_down_only_above_coeff() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.linspace(1.0, 6.0, 10)))
    apply_spectral_norm(lin, SpectralConfig(coeff=3.0))
    torch.testing.assert_close(effective_weight(lin), torch.diag(torch.linspace(1.0, 6.0, 10)) / 2.0)
    with torch.no_grad():
        raw_weight(lin).copy_(torch.diag(torch.linspace(1.0, 2.0, 10)))
    assert torch.equal(effective_weight(lin), torch.diag(torch.linspace(1.0, 2.0, 10)))


def test_power_iteration_runs_in_train_mode_only_and_gradients_reach_raw_weights() -> None:
    model = _make("cnn", 1, 8, spectral=SpectralConfig())
    layer = dict(spectral_layers(model))["body.3"]
    norm = layer.parametrizations.weight[0]
    x = torch.rand(N, 1, 8, 8)
    with torch.no_grad():
        raw_weight(layer).add_(0.1 * torch.randn_like(raw_weight(layer)))  # move off the warmed-up fixed point
    u0 = norm._u.clone()
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.equal(norm._u, u0)
    _ = effective_weight(layer)  # no side effect either
    assert torch.equal(norm._u, u0)
    model.train()
    model(x).sum().backward()
    assert not torch.equal(norm._u, u0)
    assert raw_weight(layer).grad is not None and raw_weight(layer).grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------- state_dict round trip


@pytest.mark.parametrize("name", ["cnn", "vit"])
@pytest.mark.parametrize("spectral", [None, SpectralConfig()], ids=["plain", "spectral"])
def test_state_dict_round_trip_is_bit_identical(name: str, spectral: SpectralConfig | None) -> None:
    in_channels, size = (1, 8) if name == "cnn" else (3, 32)
    trained = _make(name, in_channels, size, spectral=spectral, seed=0)
    _sgd_steps(trained, in_channels, size, steps=2, lr=0.01, batch=4)  # moves weights, BN statistics and u, v
    trained.eval()
    fresh = _make(name, in_channels, size, spectral=spectral, seed=1)
    fresh.load_state_dict(trained.state_dict())
    fresh.eval()
    x = torch.rand(4, in_channels, size, size)
    with torch.no_grad():
        assert torch.equal(trained.features(x), fresh.features(x))
        assert torch.equal(trained(x), fresh(x))
    if spectral is not None:
        assert any(k.endswith("._u") for k in trained.state_dict())


def test_deepcopy_of_spectral_model() -> None:
    model = _make("cnn", 1, 8, spectral=SpectralConfig()).eval()
    clone = copy.deepcopy(model)
    x = torch.rand(N, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
