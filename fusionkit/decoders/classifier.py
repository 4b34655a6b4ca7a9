"""Classification head on the fused vector."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from fusionkit.decoders.base import Decoder, DecoderConfig
from fusionkit.registry import register


class ClassifierConfig(DecoderConfig):
    hidden: int = Field(0, ge=0, description="0 = a single linear layer; >0 adds one hidden layer")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the fused vector")


@register("decoders", "classifier")
class ClassifierDecoder(Decoder):
    """Class logits from the fused vector: dropout + linear (optionally one hidden layer)."""

    Config = ClassifierConfig

    def __init__(self, config=None, *, dim, num_classes):
        super().__init__(config, dim=dim, num_classes=num_classes)
        cfg = self.config
        if cfg.hidden:
            self.net = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(dim, cfg.hidden), nn.GELU(),
                                     nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes))
        else:
            self.net = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(dim, num_classes))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)  # (B, d) -> (B, K)
