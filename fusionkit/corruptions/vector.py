"""Vector corruptions on standardised feature vectors ``(D,)``.

Additive noise for vectors is ``gaussian_noise`` (shared with images, see ``gaussian_noise.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fusionkit.corruptions.base import Corruption, float_array, stochastic_round
from fusionkit.registry import register


@register("corruptions", "feature_dropout")
class FeatureDropout(Corruption):
    """Zero a fraction severity of the features (chosen without replacement)."""

    kinds = ("vector",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        vector = float_array(x, (1,), kind, "(D,)")  # (D,)
        count = stochastic_round(severity * vector.shape[0], rng)
        out = vector.copy()
        out[rng.choice(vector.shape[0], size=count, replace=False)] = 0.0
        return out
