"""Bringing images to a requested (C, H, W): channel conversion, then bilinear resize.

This is how an out-of-distribution set is shown to a model trained on another shape
(e.g. photo patches at 8x8 grey for the digits model, MNIST at 32x32 RGB for a CIFAR model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from densitune.errors import ConfigError

#: ITU-R BT.601 luma weights for (R, G, B); PIL's ``convert("L")`` uses the same ones.
LUMA_601: tuple[float, float, float] = (0.299, 0.587, 0.114)


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a (C, H, W) tuple of ints; :class:`ConfigError` unless C is 1 or 3 and H, W > 0."""
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"image shape must be (C, H, W), got {shape!r}") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise ConfigError(f"image shape must be (C, H, W) with C in (1, 3) and H, W >= 1, got {tuple(shape)!r}")
    return c, h, w


def rgb_to_luma(x: torch.Tensor) -> torch.Tensor:
    """Grey level of RGB images, ITU-R BT.601: (..., 3, H, W) -> (..., 1, H, W)."""
    weights = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * weights).sum(dim=-3, keepdim=True)


def convert_images(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Convert a batch of images in [0, 1] to ``shape``.

    Args:
        x: (N, C, H, W) float, C in {1, 3}.
        shape: the target (C', H', W').

    Returns:
        (N, C', H', W') float32, contiguous, in [0, 1]. Channels first (3 -> 1 by BT.601 luma,
        1 -> 3 by repetition), then a bilinear resize with antialiasing (which only matters when
        shrinking). ``x`` itself comes back, untouched, when it already has ``shape``.
    """
    c, h, w = check_shape(shape)
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            x = rgb_to_luma(x)
        elif x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ConfigError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)  # the filter weights are >= 0; this only removes rounding error
    return x.contiguous()
