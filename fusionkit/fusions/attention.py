"""Attention fusion: a learned score per modality from z_m alone, softmax over the present ones.

``a_m = v^T tanh(W z_m + b)`` (additive attention with a learned query ``v``, one scorer
shared by every modality so it works for any M), ``w = masked_softmax(a)``,
``h = sum_m w_m z_m``. Unlike DMS the score sees only the representation, never the heads'
confidence or uncertainty: it is a learned, quality-agnostic baseline.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, masked_softmax
from fusionkit.registry import register


class AttentionConfig(FusionConfig):
    attn_hidden: int = Field(64, ge=1, description=(
        "width of the scoring MLP's hidden layer; a small one is enough to rank a few modalities"))


@register("fusions", "attention")
class AttentionFusion(Fusion):
    """Learned: w = masked_softmax(v^T tanh(W z_m + b)); h = sum_m w_m z_m.

    Example::

        fusion = AttentionFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.weights: (B, 2)
    """

    Config = AttentionConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        self.score = nn.Sequential(nn.Linear(dim, self.config.attn_hidden), nn.Tanh(),
                                   nn.Linear(self.config.attn_hidden, 1, bias=False))

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        scores = self.score(z).squeeze(-1)  # (B, M, d) -> (B, M, 1) -> (B, M)
        weights = masked_softmax(scores, mask)  # (B, M), 0 where missing
        fused = (weights.unsqueeze(-1).to(z.dtype) * z).sum(1)  # (B, d)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities)
