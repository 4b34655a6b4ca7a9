"""A hard fusion: keep only the modality whose head is most confident."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput
from fusionkit.registry import register
from fusionkit.scorers.confidence import normalized_confidence


@register("fusions", "top1")
class Top1Fusion(Fusion):
    """Winner-takes-all: h = z of the most confident present modality (example plugin)."""

    Config = FusionConfig

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        conf = normalized_confidence(unimodal_logits.detach().float().softmax(-1))  # (B, M)
        conf = conf.masked_fill(~mask, -1.0)
        weights = F.one_hot(conf.argmax(1), z.shape[1]).to(z.dtype)  # (B, M)
        fused = torch.einsum("bm,bmd->bd", weights, z)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities)
