"""Image corruptions: blur, occlusion, salt-and-pepper, contrast.

Images are ``(H, W)`` or ``(H, W, C)`` float arrays in ``[0, 1]``, uint8 arrays in ``0..255``,
or PIL images; each corruption works on float pixels in ``[0, 1]`` and returns the type and
dtype it was given (see :func:`~fusionkit.corruptions.base.to_unit_float`).
Gaussian noise lives in ``gaussian_noise.py`` because vectors share its name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from fusionkit.corruptions.base import (
    Corruption,
    CorruptionConfig,
    check_ndim,
    stochastic_round,
    to_unit_float,
)
from fusionkit.registry import register

_LAYOUT = "(H, W) or (H, W, C)"


def _image(x: Any) -> tuple[np.ndarray, Any]:
    pixels, restore = to_unit_float(x, "image")
    check_ndim(pixels, (2, 3), "image", _LAYOUT)
    return pixels, restore


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps over ``[-ceil(3 sigma), ceil(3 sigma)]``."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def blur_axis(pixels: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Convolve along one axis with mirrored borders (as scipy.ndimage's default 'reflect')."""
    radius = len(taps) // 2
    size = pixels.shape[axis]
    pad = [(0, 0)] * pixels.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(pixels, pad, mode="symmetric")
    out = np.zeros_like(pixels)
    for k, weight in enumerate(taps):  # one shifted copy per tap; kernels are short
        out += weight * np.take(padded, np.arange(k, k + size), axis=axis)
    return out


@register("corruptions", "gaussian_blur")
class GaussianBlur(Corruption):
    """Separable Gaussian blur with sigma = severity * max_sigma pixels."""

    class Config(CorruptionConfig):
        max_sigma: float = Field(3.0, gt=0, description=(
            "blur sigma in pixels at severity 1; 3 px smears detail at 32-224 px resolution"))

    kinds = ("image",)
    stochastic = False

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        pixels, restore = _image(x)  # (H, W[, C])
        taps = gaussian_kernel(severity * self.config.max_sigma)
        blurred = blur_axis(blur_axis(pixels, taps, axis=0), taps, axis=1)  # rows, then columns
        return restore(blurred)


@register("corruptions", "occlusion")
class Occlusion(Corruption):
    """Fill one random square with 0; side = max(1, round(severity * max_side * min(H, W)))."""

    class Config(CorruptionConfig):
        max_side: float = Field(0.8, gt=0, le=1, description=(
            "square side at severity 1, as a fraction of the shorter image side; 0.8 hides 64% "
            "of a square image, which leaves a digits image head near chance (~18%)"))

    kinds = ("image",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        pixels, restore = _image(x)  # (H, W[, C])
        height, width = pixels.shape[:2]
        side = max(1, round(severity * self.config.max_side * min(height, width)))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        out = pixels.copy()
        out[top:top + side, left:left + side] = 0.0  # every channel
        return restore(out)


@register("corruptions", "salt_pepper")
class SaltPepper(Corruption):
    """Set a fraction severity * max_fraction of pixels to black or white (half each, in expectation)."""

    class Config(CorruptionConfig):
        max_fraction: float = Field(0.6, gt=0, le=1, description=(
            "fraction of pixels hit at severity 1; past ImageNet-C's strongest impulse noise "
            "(0.27) so that severity 1 removes most of an image's information"))

    kinds = ("image",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        pixels, restore = _image(x)  # (H, W[, C])
        height, width = pixels.shape[:2]
        count = stochastic_round(severity * self.config.max_fraction * height * width, rng)
        flat = rng.choice(height * width, size=count, replace=False)  # (count,) pixel indices
        rows, cols = np.unravel_index(flat, (height, width))
        out = pixels.copy()
        out[rows, cols] = rng.integers(0, 2, size=count).astype(np.float64).reshape(
            (count,) + (1,) * (pixels.ndim - 2))  # 0 = pepper, 1 = salt, same on every channel
        return restore(out)


@register("corruptions", "contrast")
class Contrast(Corruption):
    """Blend towards the per-channel mean: x' = mean + (1 - severity) * (x - mean)."""

    kinds = ("image",)
    stochastic = False

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        pixels, restore = _image(x)  # (H, W[, C])
        mean = pixels.mean(axis=(0, 1), keepdims=True)  # (1, 1[, C])
        return restore(mean + (1.0 - severity) * (pixels - mean))
