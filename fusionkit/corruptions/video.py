"""Video corruptions on raw clips: ``(F, H, W, C)`` uint8 in ``0..255`` or float in ``[0, 1]``."""

from __future__ import annotations

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
from fusionkit.errors import DataError
from fusionkit.registry import register

_LAYOUT = "(F, H, W, C)"


@register("corruptions", "frame_drop")
class FrameDrop(Corruption):
    """Replace a fraction severity of frames 2..F with the previous kept frame (a stuttering stream)."""

    kinds = ("video",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        if not isinstance(x, np.ndarray):
            raise DataError(f"video corruption expects a numpy array {_LAYOUT} "
                            f"(got {type(x).__name__})")
        check_ndim(x, (4,), kind, _LAYOUT)
        frames = x.shape[0]
        count = stochastic_round(severity * (frames - 1), rng)  # the first frame is always kept
        later = rng.choice(frames - 1, size=count, replace=False) if count else []  # (count,)
        dropped = {1 + int(f) for f in later}
        out = x.copy()
        for f in range(1, frames):  # in order, so a run of drops freezes on the last kept frame
            if f in dropped:
                out[f] = out[f - 1]
        return out


@register("corruptions", "frame_noise")
class FrameNoise(Corruption):
    """Gaussian noise on every frame with std = severity * max_std (pixel range [0, 1]), clipped."""

    class Config(CorruptionConfig):
        max_std: float = Field(2.0, gt=0, description=(
            "noise std at severity 1 in units of the [0, 1] pixel range (uint8 scaled by 255); "
            "2.0 as for image gaussian_noise, so severity 1 leaves little of each frame"))

    kinds = ("video",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        pixels, restore = to_unit_float(x, kind)  # (F, H, W, C) in [0, 1]
        check_ndim(pixels, (4,), kind, _LAYOUT)
        noise = rng.normal(0.0, severity * self.config.max_std, size=pixels.shape)
        return restore(pixels + noise)
