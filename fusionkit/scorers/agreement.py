"""Agreement: how much probability modality m's head gives to the answer the others agree on.

The paper's alignment ``cos(z_m, mean of the others)`` is symmetric: with two modalities
``cos(z_1, z_2) = cos(z_2, z_1)``, so both get the same number and it cancels in the softmax.
Agreement reads the heads' predictions instead, and is asymmetric by construction:

    q_{-m} = sum_{j != m, present} c_j p_j / sum_{j != m, present} c_j    (confidence-weighted consensus)
    a_m    = p_m[argmax_k q_{-m,k}]                                        (in [0, 1])

A modality whose head puts little mass on the class the others vote for gets a low score; with
two modalities, ``a_1 = p_1[argmax p_2]`` and ``a_2 = p_2[argmax p_1]`` differ whenever the two
heads disagree. A modality with no other present modality gets 0 (its weight is 1 anyway).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig
from fusionkit.scorers.confidence import normalized_confidence


def agreement(probs: Tensor, mask: Tensor, confidence: Tensor | None = None) -> Tensor:
    """``a_m = p_m[argmax q_{-m}]``; 0 where no other modality is present.

    Args:
        probs: head probabilities ``(B, M, K)``.
        mask: presence ``(B, M)`` bool.
        confidence: ``normalized_confidence(probs)`` ``(B, M)`` if the caller has it.
    """
    if confidence is None:
        confidence = normalized_confidence(probs)  # (B, M)
    c = confidence * mask.to(probs.dtype) + 1e-6 * mask.to(probs.dtype)  # (B, M); > 0 iff present
    total = torch.bmm(c.unsqueeze(1), probs).squeeze(1)  # (B, 1, M) @ (B, M, K) -> (B, K): over present heads
    others = total.unsqueeze(1) - c.unsqueeze(-1) * probs  # (B, M, K): the same sum without head m
    vote = others.argmax(-1, keepdim=True)  # (B, M, 1): the class the other heads agree on
    a = probs.gather(-1, vote).squeeze(-1)  # (B, M)
    valid = mask & ((mask.sum(1, keepdim=True) - mask.long()) > 0)
    return torch.where(valid, a, torch.zeros((), dtype=a.dtype, device=a.device))


@register("scorers", "agreement")
class AgreementScorer(Scorer):
    """Agreement a = probability head m gives to the confidence-weighted vote of the other heads."""

    Config = ScorerConfig
    signal = "agreement"

    def forward(self, ctx: ScoreContext) -> Tensor:
        probs = ctx.probs()  # (B, M, K), shared with the confidence scorer
        confidence = ctx.shared("confidence", lambda: normalized_confidence(probs))  # (B, M)
        return agreement(probs, ctx.mask, confidence)  # (B, M)
