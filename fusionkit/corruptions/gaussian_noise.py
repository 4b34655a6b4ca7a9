"""Additive Gaussian noise for images and feature vectors (one name, dispatched on ``kind``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from fusionkit.corruptions.base import (
    Corruption,
    CorruptionConfig,
    check_ndim,
    float_array,
    to_unit_float,
)
from fusionkit.registry import register


@register("corruptions", "gaussian_noise")
class GaussianNoise(Corruption):
    """Add N(0, std^2) noise: std = severity * image_std (pixels, clipped) or severity * scale."""

    class Config(CorruptionConfig):
        image_std: float = Field(2.0, gt=0, description=(
            "noise std at severity 1 for images, in units of the [0, 1] pixel range (uint8 "
            "images are scaled by 255); at 2.0 (clipped) a digits image head falls to ~16% "
            "(chance 10%), so severity 1 removes most of the modality's information"))
        scale: float = Field(6.0, gt=0, description=(
            "noise std at severity 1 for vectors, in units of a standardised feature's std: 6 "
            "puts a view near -16 dB SNR, where a digits view's head is near chance (QMF's tests "
            "go to std 10)"))

    kinds = ("image", "vector")

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        if kind == "vector":  # unbounded features: no clipping
            x = float_array(x, (1,), kind, "(D,)")
            noise = rng.normal(0.0, severity * self.config.scale, size=x.shape)  # (D,)
            return (x + noise).astype(x.dtype)
        pixels, restore = to_unit_float(x, kind)  # (H, W) or (H, W, C) in [0, 1]
        check_ndim(pixels, (2, 3), kind, "(H, W) or (H, W, C)")
        noise = rng.normal(0.0, severity * self.config.image_std, size=pixels.shape)
        return restore(pixels + noise)  # clipped back to the valid range
