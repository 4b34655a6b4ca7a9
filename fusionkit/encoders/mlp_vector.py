"""Feature-vector encoder: an MLP over a fixed-length vector."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderConfig
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register


class MLPConfig(EncoderConfig):
    hidden: int = Field(256, ge=1, description="hidden and output width")
    layers: int = Field(2, ge=1, description="number of linear layers")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout between layers")
    in_dim: int | None = Field(None, ge=1, description="input length; None = from the dataset")


@register("encoders", "mlp")
class MLPVectorEncoder(Encoder):
    """Vector features -> MLP (Linear, GELU, dropout) -> (B, hidden).

    Tokens: a feature vector has no natural sequence, so :meth:`encode` is the base class's
    fallback on purpose: the pooled ``(B, hidden)`` vector as one token, ``(B, 1, hidden)``.
    """

    Config = MLPConfig
    kinds = ("vector",)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        cfg = self.config
        in_dim = cfg.in_dim or spec.dim
        if not in_dim:
            raise ConfigError("encoder mlp: set in_dim (the dataset does not say the vector length)")
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        width = in_dim
        for i in range(cfg.layers):
            layers.append(nn.Linear(width, cfg.hidden))
            if i < cfg.layers - 1:
                layers += [nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        self.net = nn.Sequential(*layers)
        self.out_dim = cfg.hidden
        self.apply_trainable()

    def preprocess(self, raw: Any) -> Tensor:
        x = torch.as_tensor(np.asarray(raw, dtype=np.float32))
        if x.shape != (self.in_dim,):
            raise DataError(f"vector has shape {tuple(x.shape)}, expected ({self.in_dim},)")
        return x

    def preprocess_column(self, raws: list[Any]) -> Tensor | None:
        try:
            x = torch.as_tensor(np.asarray(raws, dtype=np.float32))  # (N, in_dim)
        except (TypeError, ValueError):  # ragged or not numbers: per sample, which names the bad one
            return None
        return x if x.shape == (len(raws), self.in_dim) else None

    def trainable_blocks(self):
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, in_dim) -> (B, hidden)
