"""Semantic alignment: cosine of ``z_m`` with the mean of the other present modalities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig


def alignment(z: Tensor, mask: Tensor) -> Tensor:
    """``s_m = cos(z_m, mean_{j != m, present} z_j)``; 0 where no other modality is present.

    Args:
        z: ``(B, M, d)`` with missing rows already zeroed.
        mask: ``(B, M)`` bool.
    """
    m = mask.to(z.dtype).unsqueeze(-1)  # (B, M, 1)
    total = (z * m).sum(dim=1, keepdim=True)  # (B, 1, d)
    others = mask.sum(dim=1, keepdim=True).unsqueeze(-1) - m  # (B, M, 1): count of the others
    mean_others = (total - z * m) / others.clamp(min=1)  # (B, M, d)
    s = F.cosine_similarity(z, mean_others, dim=-1, eps=1e-8)  # (B, M)
    valid = mask & (others.squeeze(-1) > 0)
    return torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))


@register("scorers", "alignment")
class AlignmentScorer(Scorer):
    """Alignment s = cosine of z_m with the mean of the other present modalities."""

    Config = ScorerConfig
    signal = "alignment"

    def forward(self, ctx: ScoreContext) -> Tensor:
        return alignment(ctx.z.float(), ctx.mask)
