"""Decoders: fused ``h (B, d)`` -> task output."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn


class DecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Decoder(nn.Module):
    Config = DecoderConfig

    def __init__(self, config: BaseModel | None = None, *, dim: int, num_classes: int):
        super().__init__()
        self.config = config or self.Config()
        self.dim = dim
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, config: BaseModel, *, dim: int, num_classes: int):
        return cls(config, dim=dim, num_classes=num_classes)
