"""Static fusion: the uniform mean of the present modalities."""

from __future__ import annotations

from torch import Tensor

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, uniform_weights
from fusionkit.registry import register


@register("fusions", "mean")
class MeanFusion(Fusion):
    """Static: h = mean of the present z_m (every modality weighted equally, every sample)."""

    Config = FusionConfig

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        weights = uniform_weights(mask, z.dtype)  # (B, M)
        fused = (weights.unsqueeze(-1) * z).sum(1)  # (B, d)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities)
