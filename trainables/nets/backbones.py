"""Feature extractors: a registry of backbone bodies and the :class:`FeatureNet` that wraps them.

Every model is ``Normalize -> body -> flatten -> projection -> z``, with a linear ``head`` on ``z`` for the logits.
The input normalisation is the model's first module, so inputs (and any input perturbation, cf. Lee et al., 2018)
live in [0, 1] pixel space. The feature ``z`` of shape ``(N, D)`` is what the densities (DDU's per-class Gaussians,
Mukhoti et al., 2021) are fitted on.

Backbones (all randomly initialised, ``weights=None``; small-input variants for 8-32 pixel images):

==========  ===========================================================================================  ========
name        body                                                                                         body_dim
==========  ===========================================================================================  ========
cnn         3 x (conv 3x3 - BN - ReLU), 32/64/128 channels, strides 1/2/2, global average pool;           128
            + conv 3x3 stride 2 layers (128) until the receptive field covers the input (28/32 px: 5)
resnet18    torchvision ResNet-18 (He et al., 2016), conv1 3x3 stride 1, no max-pool, fc removed           512
resnet50    torchvision ResNet-50, same adaptation                                                       2048
vgg16       VGG-16 with BN (Simonyan & Zisserman, 2015), torchvision layout, pools skipped at 1 pixel     512
wrn28_10    WideResNet-28-10 (Zagoruyko & Komodakis, 2016) in DDU's variant                              640
wrn16_4     WideResNet-16-4, same code (a small one for quick runs and tests)                            256
vit         torchvision VisionTransformer (Dosovitskiy et al., 2021): 6 layers, 8 heads, width 256,      256
            MLP 512, patch 4 (2 or 1 when the image size is not divisible by 4)
==========  ===========================================================================================  ========

Each factory has the signature ``factory(in_channels, image_size, spectral) -> (body, body_dim)``; ``body`` maps
``(N, in_channels, image_size, image_size)`` to ``(N, body_dim)`` (or ``(N, body_dim, 1, 1)``, flattened by
:class:`FeatureNet`). When ``spectral`` is given, every conv/linear weight of the body is soft-spectrally normalised
(:mod:`densitune.trainables.nets.spectral`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densitune.errors import ConfigError
from densitune.registry import Registry
from densitune.trainables.nets.spectral import SpectralConfig, apply_spectral_norm, effective_weight, spectral_layers

if TYPE_CHECKING:
    from torchvision import models as tvm

__all__ = [
    "BACKBONES",
    "BackboneFactory",
    "SpectralConfig",
    "Normalize",
    "FeatureNet",
    "WideResNet",
    "create_model",
    "backbone_names",
    "vit_patch_size",
    "cnn_plan",
    "receptive_field",
    "spectral_layers",
    "effective_weight",
]

BackboneFactory = Callable[[int, int, SpectralConfig | None], tuple[nn.Module, int]]

#: name -> ``factory(in_channels, image_size, spectral) -> (body, body_dim)``.
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def backbone_names() -> list[str]:
    """Sorted names of the registered backbones."""
    return BACKBONES.names()


def _finish(body: nn.Module, body_dim: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """Common tail of every factory: normalise the body's conv/linear weights when asked."""
    if spectral is not None:
        apply_spectral_norm(body, spectral)
    return body, body_dim


# --------------------------------------------------------------------------------------------------------------------
# Model wrapper
# --------------------------------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``x`` (N, C, H, W) -> same shape. Mean and std are buffers (saved, moved
    with the model, never trained)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class FeatureNet(nn.Module):
    """``Normalize(mean, std) -> body -> flatten -> projection Linear(body_dim, D) -> z``; ``head Linear(D, C)``.

    ``z`` is the raw output of the projection: no nonlinearity or normalisation after it. DDU fits its Gaussians on
    the penultimate features directly; here the penultimate layer *is* the projection, so ``z`` stays the input of the
    final linear classifier, exactly as in DDU, while its width ``D`` is a free hyperparameter for every backbone. All
    bodies already end in a nonlinearity + pooling (ResNet/VGG/WRN/CNN: ReLU-family then average pool; ViT: LayerNorm
    of the class token), so nothing is inserted before the projection either.

    With spectral normalisation the body and the projection are normalised; the head is not, as in DDU's reference
    code, where the final classifier is a plain ``nn.Linear``. ``head.weight`` of shape ``(C, D)`` is therefore the
    plain last-layer weight that GradNorm (Huang et al., 2021) differentiates.

    Attributes:
        feature_dim: D.
        num_classes: C.
        body_dim: width of the body's output.
    """

    def __init__(
        self,
        body: nn.Module,
        body_dim: int,
        *,
        num_classes: int,
        feature_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        spectral: SpectralConfig | None = None,
    ) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.body_dim = int(body_dim)
        self.normalize = Normalize(mean, std)
        self.body = body
        self.projection = nn.Linear(body_dim, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        if spectral is not None:
            apply_spectral_norm(self.projection, spectral)

    def features(self, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) in [0, 1] pixel space -> features ``z`` (N, D)."""
        h = self.body(self.normalize(x))
        return self.projection(torch.flatten(h, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) in [0, 1] -> logits (N, num_classes) = ``head(features(x))``."""
        return self.head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (N, C, H, W) in [0, 1] -> (``z`` (N, D), logits (N, num_classes)) from one forward pass."""
        z = self.features(x)
        return z, self.head(z)


def create_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    feature_dim: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    spectral: SpectralConfig | None = None,
) -> FeatureNet:
    """Build backbone ``name`` wrapped in a :class:`FeatureNet` (random init; seed torch first for a reproducible one).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known names).
        ConfigError: a non-positive size, ``feature_dim`` <= 0, or ``mean``/``std`` not matching ``in_channels``.
    """
    factory = BACKBONES.get(name)
    if feature_dim <= 0:
        raise ConfigError(f"feature_dim (D) must be > 0, got {feature_dim}")
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be > 0, got {num_classes}")
    if in_channels <= 0 or image_size <= 0:
        raise ConfigError(f"in_channels and image_size must be > 0, got {in_channels} and {image_size}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean and std need {in_channels} values (one per channel), got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise ConfigError(f"std must be > 0 per channel, got {tuple(std)}")
    body, body_dim = factory(in_channels, image_size, spectral)
    return FeatureNet(
        body, body_dim, num_classes=num_classes, feature_dim=feature_dim, mean=mean, std=std, spectral=spectral
    )


# --------------------------------------------------------------------------------------------------------------------
# cnn
# --------------------------------------------------------------------------------------------------------------------


def receptive_field(strides: Sequence[int]) -> int:
    """Receptive field width in input pixels of a stack of 3x3 convs with these strides."""
    rf, jump = 1, 1
    for s in strides:
        rf, jump = rf + 2 * jump, jump * s
    return rf


def cnn_plan(image_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Widths and strides of :func:`make_cnn`'s conv layers for an ``image_size`` input.

    Up to 9 pixels: 32/64/128 channels with strides 1/2/2, a receptive field of 9 pixels (the 8x8 digits). Larger
    inputs downsample from the first layer (strides 2/2/2, field 15) and get conv 3x3 stride 2 layers of 128
    channels appended while the field is narrower than the input; each doubles the jump between output pixels
    (field 15 -> 31 -> 63 ...: 28 pixels get 4 layers, 32 pixels 5).
    """
    widths, strides = [32, 64, 128], [1, 2, 2]
    if image_size > 9:  # downsample from the first layer on
        strides[0] = 2
    while receptive_field(strides) < image_size:
        widths.append(128)
        strides.append(2)
    return tuple(widths), tuple(strides)


@BACKBONES.register("cnn")
def make_cnn(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """A small CPU-friendly CNN whose receptive field covers its whole input: (conv 3x3 - BN - ReLU) layers, then a
    global average pool; (N, C, H, W) -> (N, 128, 1, 1). Works for any H, W >= 1.

    Up to 9x9 inputs (the 8x8 digits train in seconds) it is 3 layers, 32/64/128 channels, strides 1/2/2 (a 9-pixel
    receptive field), exactly as before the adaptation. Larger inputs downsample from the first layer and get conv
    3x3 stride 2 layers of 128 channels until the receptive field is at least as wide as the input
    (:func:`cnn_plan`: 28x28 -> 4 layers, field 31; 32x32 -> 5 layers, field 63), so each feature before the pool
    integrates an image-wide window (the 3-layer net on 28x28 digits, field 9, reached only 96-97 %)."""
    widths, strides = cnn_plan(image_size)
    layers: list[nn.Module] = []
    c = in_channels
    for w, s in zip(widths, strides):
        layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    layers.append(nn.AdaptiveAvgPool2d(1))
    body = nn.Sequential(*layers)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return _finish(body, widths[-1], spectral)


# --------------------------------------------------------------------------------------------------------------------
# ResNet-18 / 50 (torchvision, small-input stem)
# --------------------------------------------------------------------------------------------------------------------


def _small_input_resnet(resnet: tvm.ResNet, in_channels: int) -> tuple[nn.Module, int]:
    """The usual CIFAR stem: conv1 3x3 stride 1 padding 1 from ``in_channels``, no max-pool, fc removed, so the body
    maps (N, C, H, W) -> (N, 512 * expansion) through torchvision's own adaptive average pool."""
    body_dim = resnet.fc.in_features
    resnet.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    resnet.maxpool = nn.Identity()
    resnet.fc = nn.Identity()
    return resnet, body_dim


@BACKBONES.register("resnet18")
def make_resnet18(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 (He et al., 2016) with the small-input stem; body_dim 512."""
    from torchvision import models as tvm  # here, not at the top: importing torchvision costs seconds

    return _finish(*_small_input_resnet(tvm.resnet18(weights=None), in_channels), spectral)


@BACKBONES.register("resnet50")
def make_resnet50(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 with the small-input stem; body_dim 2048."""
    from torchvision import models as tvm

    return _finish(*_small_input_resnet(tvm.resnet50(weights=None), in_channels), spectral)


# --------------------------------------------------------------------------------------------------------------------
# VGG-16 with batch norm
# --------------------------------------------------------------------------------------------------------------------

#: VGG-16 ("configuration D" of Simonyan & Zisserman, 2015): conv widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


@BACKBONES.register("vgg16")
def make_vgg16(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """VGG-16-BN features as torchvision's ``vgg16_bn`` lays them out (same ``features.<i>`` indices), then a global
    average pool; (N, C, S, S) -> (N, 512, 1, 1).

    Departures from torchvision's ``vgg16_bn``: the first conv takes ``in_channels``; a max-pool that would act on a
    1-pixel map is replaced by ``nn.Identity`` (28 -> 14 -> 7 -> 3 -> 1 keeps four pools, 8x8 keeps three, 32x32 keeps
    all five), so the map never shrinks to 0; ``avgpool`` is ``AdaptiveAvgPool2d(1)`` and the 4096-wide classifier is
    dropped (the CIFAR VGG of DDU also ends in a single linear layer on 512 features). The layers are built here rather
    than by ``vgg16_bn(weights=None)`` so as not to allocate that classifier's 120M unused parameters.
    """
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for v in _VGG16_CFG:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                layers.append(nn.Identity())
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    features = nn.Sequential(*layers)
    for m in features.modules():  # torchvision's VGG init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(cast(Tensor, m.bias))  # every conv above has a bias
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    body = nn.Sequential(OrderedDict(features=features, avgpool=nn.AdaptiveAvgPool2d(1)))
    return _finish(body, c, spectral)


# --------------------------------------------------------------------------------------------------------------------
# WideResNet (DDU's variant)
# --------------------------------------------------------------------------------------------------------------------


class _WideBasic(nn.Module):
    """Pre-activation wide block: BN - act - conv3x3(stride) - BN - act - dropout - conv3x3, plus shortcut.

    With ``mod`` (DDU's "modified" WRN) the activation is LeakyReLU and a shortcut that changes shape is a
    parameter-free average pool plus zero channel padding, which keeps the shortcut non-expansive; without it,
    ReLU and a 1x1 strided conv as in Zagoruyko & Komodakis.
    """

    def __init__(self, in_c: int, out_c: int, stride: int, dropout_rate: float, mod: bool) -> None:
        super().__init__()
        self.in_c, self.out_c, self.stride, self.mod = in_c, out_c, stride, mod
        self.bn1 = nn.BatchNorm2d(in_c, momentum=0.01)
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c, momentum=0.01)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_c, out_c, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if (stride != 1 or in_c != out_c) and not mod:
            self.shortcut = nn.Conv2d(in_c, out_c, 1, stride=stride, bias=False)

    def _act(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x) if self.mod else F.relu(x)

    def _skip(self, x: Tensor) -> Tensor:
        if self.shortcut is not None:
            return self.shortcut(x)
        if self.stride == 1 and self.in_c == self.out_c:
            return x
        # ceil_mode keeps the shape equal to the strided conv's, ceil(S / stride), for odd sizes (7 -> 4).
        x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True) if self.stride != 1 else x
        return F.pad(x, (0, 0, 0, 0, 0, self.out_c - self.in_c))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self._act(self.bn1(x)))
        out = self.conv2(self.dropout(self._act(self.bn2(out))))
        return out + self._skip(x)


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis, 2016) as in DDU's ``net/wide_resnet.py``.

    conv3x3(16) -> 3 groups of ``(depth - 4) / 6`` wide blocks with widths 16k/32k/64k and strides 1/2/2 -> BN -> act
    -> global average pool; (N, C, H, W) -> (N, 64k). Defaults follow DDU: ``mod=True`` (LeakyReLU, pooled shortcuts),
    dropout 0.3, BN momentum 0.01, Kaiming-normal fan-out init. Departure: DDU pools with a fixed 8x8 window (32x32
    inputs only); here the pool is adaptive, so 8x8 and 28x28 inputs work too.
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        depth: int = 28,
        widen_factor: int = 10,
        dropout_rate: float = 0.3,
        mod: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ConfigError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.out_dim = widths[-1]
        self.mod = mod
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for (in_c, out_c), stride in zip(zip(widths[:-1], widths[1:]), (1, 2, 2)):
            blocks = [_WideBasic(in_c if i == 0 else out_c, out_c, stride if i == 0 else 1, dropout_rate, mod)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = groups
        self.bn1 = nn.BatchNorm2d(widths[-1], momentum=0.01)
        nonlinearity: Literal["leaky_relu", "relu"] = "leaky_relu" if mod else "relu"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 64 * widen_factor)."""
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.leaky_relu(self.bn1(out)) if self.mod else F.relu(self.bn1(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@BACKBONES.register("wrn28_10")
def make_wrn28_10(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """WideResNet-28-10, DDU's main model (36.2M body parameters); body_dim 640."""
    body = WideResNet(in_channels, depth=28, widen_factor=10)
    return _finish(body, body.out_dim, spectral)


@BACKBONES.register("wrn16_4")
def make_wrn16_4(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """WideResNet-16-4, the same code at a CPU-friendly size (2.7M parameters); body_dim 256."""
    body = WideResNet(in_channels, depth=16, widen_factor=4)
    return _finish(body, body.out_dim, spectral)


# --------------------------------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------------------------------


def vit_patch_size(image_size: int) -> int:
    """Patch size for a small input: 4 if it divides ``image_size``, else 2 if that does, else 1."""
    for p in (4, 2):
        if image_size % p == 0:
            return p
    return 1


@BACKBONES.register("vit")
def make_vit(in_channels: int, image_size: int, spectral: SpectralConfig | None) -> tuple[nn.Module, int]:
    """A small torchvision ``VisionTransformer`` (Dosovitskiy et al., 2021): 6 layers, 8 heads, hidden 256, MLP 512,
    patch :func:`vit_patch_size` (4 for 28 and 32 pixels), no dropout; (N, C, S, S) -> (N, 256), the final
    LayerNorm of the class token.

    ``conv_proj`` is rebuilt for ``in_channels`` with torchvision's init; ``heads`` is removed. The body accepts only
    ``image_size`` x ``image_size`` inputs (fixed position embeddings).
    """
    from torchvision import models as tvm

    hidden = 256
    patch = vit_patch_size(image_size)
    vit = tvm.VisionTransformer(
        image_size=image_size, patch_size=patch, num_layers=6, num_heads=8, hidden_dim=hidden, mlp_dim=512
    )
    vit.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
    fan_in = in_channels * patch * patch
    nn.init.trunc_normal_(vit.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(vit.conv_proj.bias)
    vit.heads = nn.Identity()
    return _finish(vit, hidden, spectral)
