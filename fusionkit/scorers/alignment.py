"""Semantic alignment: cosine of ``z_m`` with the mean of the other present modalities."""

from __future__ import annotations

import torch
from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig


def alignment(z: Tensor, mask: Tensor) -> Tensor:
    """``s_m = cos(z_m, mean_{j != m, present} z_j)``; 0 where no other modality is present.

    Args:
        z: ``(B, M, d)``; missing rows are ignored (they must be finite: ``stack_modalities`` zeroes them).
        mask: ``(B, M)`` bool.
    """
    # Everything follows from the Gram matrix G = z z^T, one batched matmul over the B samples,
    # with no (B, M, d) temporaries. With S = sum of the present z and o_m = S - z_m:
    # z_m.S = sum_{j present} G_mj, |S|^2 = sum_{m present} z_m.S, z_m.o_m = z_m.S - G_mm and
    # |o_m|^2 = |S|^2 - 2 z_m.S + G_mm.
    m = mask.to(z.dtype)  # (B, M)
    gram = torch.bmm(z, z.transpose(1, 2))  # (B, M, d) @ (B, d, M) -> (B, M, M)
    zz = gram.diagonal(dim1=1, dim2=2)  # (B, M): |z_m|^2
    zs = (gram * m.unsqueeze(1)).sum(-1)  # (B, M): z_m . S
    ss = (zs * m).sum(-1, keepdim=True)  # (B, 1): |S|^2
    dot = zs - zz  # z_m . o_m
    oo = torch.add(ss, zs, alpha=-2).add_(zz).clamp_min_(0)  # |o_m|^2 = |S|^2 - 2 z_m.S + |z_m|^2
    # cos = dot / (|z_m| |o_m|), the mean's 1/(n-1) cancels; the floor sits before the square root
    # so that a zero norm (missing or lone modality) gives a zero gradient, not NaN
    s = dot / (zz * oo).clamp_min(1e-16).sqrt()  # (B, M)
    alone = ~(mask & (mask.sum(1, keepdim=True) > 1))  # (B, M): missing, or no other modality present
    return s.masked_fill(alone, 0.0)


@register("scorers", "alignment")
class AlignmentScorer(Scorer):
    """Alignment s = cosine of z_m with the mean of the other present modalities."""

    Config = ScorerConfig
    signal = "alignment"

    def forward(self, ctx: ScoreContext) -> Tensor:
        return alignment(ctx.z.float(), ctx.mask)
