"""Late (decision-level) fusion: average the unimodal heads' logits over present modalities.

``logits = sum_m w_m * logits_m`` with ``w`` uniform over the present modalities, so the
model skips its decoder. Raw logits are averaged (not probabilities): the result is the
normalised geometric mean of the heads' softmax outputs (a product of experts), and a
missing modality simply drops out of the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, uniform_weights
from fusionkit.registry import register


@register("fusions", "late")
class LateFusion(Fusion):
    """Decision level: logits = mean of the present heads' logits; h = mean of the present z_m.

    Example::

        fusion = LateFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.logits: (B, 10)
        loss = F.cross_entropy(out.logits, y) + fusion.loss(out, y)
    """

    Config = FusionConfig

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        weights = uniform_weights(mask, z.dtype)  # (B, M)
        fused = (weights.unsqueeze(-1) * z).sum(1)  # (B, d)
        present = torch.where(mask.unsqueeze(-1), unimodal_logits,
                              torch.zeros((), dtype=unimodal_logits.dtype, device=unimodal_logits.device))
        logits = (weights.unsqueeze(-1).to(present.dtype) * present).sum(1)  # (B, M, K) -> (B, K)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities, logits=logits)
