"""Semantic alignment: cosine of ``z_m`` with the mean of the other present modalities."""

from __future__ import annotations

import torch
from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig


def alignment(z: Tensor, mask: Tensor) -> Tensor:
    """``s_m = cos(z_m, mean_{j != m, present} z_j)``; 0 where no other modality is present.

    Args:
        z: ``(B, M, d)`` with missing rows already zeroed.
        mask: ``(B, M)`` bool.
    """
    # Everything follows from three dot products, with no (B, M, d) temporaries:
    # o_m = S - z_m with S = sum of present z; cos = (z.S - |z|^2) / (|z| |S - z|)
    m = mask.to(z.dtype)  # (B, M)
    total = torch.einsum("bm,bmd->bd", m, z)  # (B, d)
    zz = z.square().sum(-1)  # (B, M)
    zs = torch.einsum("bmd,bd->bm", z, total)  # (B, M)
    ss = total.square().sum(-1, keepdim=True)  # (B, 1)
    dot = zs - zz  # z_m . o_m
    oo = (ss - 2 * zs + zz).clamp_min(0)  # |o_m|^2
    s = dot / (zz.sqrt() * oo.sqrt()).clamp_min(1e-8)  # (B, M); the mean's 1/(n-1) cancels
    others = mask.sum(1, keepdim=True) - mask.long()  # (B, M): how many other modalities
    valid = mask & (others > 0)
    return torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))


@register("scorers", "alignment")
class AlignmentScorer(Scorer):
    """Alignment s = cosine of z_m with the mean of the other present modalities."""

    Config = ScorerConfig
    signal = "alignment"

    def forward(self, ctx: ScoreContext) -> Tensor:
        return alignment(ctx.z.float(), ctx.mask)
