"""A quality signal: the gap between the top-2 class probabilities of each unimodal head."""

from __future__ import annotations

from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig


@register("scorers", "margin")
class MarginScorer(Scorer):
    """Margin between the two most likely classes of each head, in [0, 1] (example plugin)."""

    Config = ScorerConfig
    signal = "margin"

    def forward(self, ctx: ScoreContext) -> Tensor:
        top2 = ctx.logits.float().softmax(-1).topk(2, dim=-1).values  # (B, M, 2)
        return top2[..., 0] - top2[..., 1]  # (B, M)
