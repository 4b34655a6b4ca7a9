"""Early fusion: concatenate the modalities (missing ones zeroed) and mix them with an MLP."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, uniform_weights
from fusionkit.registry import register


class ConcatConfig(FusionConfig):
    mlp_hidden: int = Field(256, ge=1, description="hidden width of the mixing MLP")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the mixing MLP")


@register("fusions", "concat")
class ConcatFusion(Fusion):
    """Static: h = MLP([z_1; ...; z_M]) with missing modalities zeroed; no per-sample weights."""

    Config = ConcatConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        cfg = self.config
        self.mix = nn.Sequential(
            nn.Linear(len(self.modalities) * dim, cfg.mlp_hidden), nn.GELU(),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.mlp_hidden, dim))

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        B, M, d = z.shape
        fused = self.mix(z.reshape(B, M * d))  # (B, M*d) -> (B, d)
        # concat has no weights of its own; report the uniform ones it implicitly applies
        return FusionOutput(fused=fused, weights=uniform_weights(mask, z.dtype),
                            unimodal_logits=unimodal_logits, mask=mask, z=z,
                            modalities=self.modalities)
