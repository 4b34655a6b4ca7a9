"""The modality is missing: dropped with probability severity, for any kind."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from fusionkit.corruptions.base import Corruption
from fusionkit.registry import register


@register("corruptions", "missing")
class Missing(Corruption):
    """Drop the modality (return None) with probability severity; otherwise return it unchanged.

    The caller turns None into a False entry of the presence mask, so the fusion sees the
    sample exactly as one that never had this modality.
    """

    kinds = ("*",)
    drops_modality = True

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        # rng.random() is in [0, 1), so severity 1 always drops.
        return None if rng.random() < severity else copy.deepcopy(x)
