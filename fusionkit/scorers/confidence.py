"""Confidence from prediction entropy: ``c_m = 1 - H(p_m) / log K``."""

from __future__ import annotations

import math

from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig


def normalized_confidence(probs: Tensor) -> Tensor:
    """``1 - H(p) / log K`` over the last dim, in [0, 1] (the paper's ``1 - H`` is negative for K > e)."""
    K = probs.shape[-1]
    neg_entropy = (probs * probs.clamp_min(1e-12).log()).sum(-1)  # -H(p)
    return 1.0 + neg_entropy / math.log(K)  # = 1 - H / log K, bit for bit


@register("scorers", "confidence")
class ConfidenceScorer(Scorer):
    """Confidence c = 1 - H(p)/log K of each unimodal head (high = peaked prediction)."""

    Config = ScorerConfig
    signal = "confidence"

    def forward(self, ctx: ScoreContext) -> Tensor:
        return ctx.shared("confidence", lambda: normalized_confidence(ctx.probs()))  # (B, M)
