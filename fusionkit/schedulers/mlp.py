"""Learned scheduler: ``w = masked_softmax(MLP([c, u, s, ...]))``, one MLP shared by all modalities."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.fusions.base import masked_softmax
from fusionkit.registry import register
from fusionkit.schedulers.base import Scheduler, SchedulerConfig


class MLPSchedulerConfig(SchedulerConfig):
    hidden: int = Field(32, ge=1, description="hidden width; the input is only a few signals")
    layers: int = Field(2, ge=1, description="number of linear layers")


@register("schedulers", "mlp")
class MLPScheduler(Scheduler):
    """Learned: a small MLP shared across modalities maps each modality's signals to a logit."""

    Config = MLPSchedulerConfig

    def __init__(self, config=None, *, signals):
        super().__init__(config, signals=signals)
        cfg = self.config
        width = max(len(self.signals), 1)
        layers: list[nn.Module] = []
        for _ in range(cfg.layers - 1):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU()]
            width = cfg.hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
        if self.signals:
            feats = self.features(scores, mask)  # (B, M, S), standardised if configured
        else:
            feats = mask.unsqueeze(-1).float()  # (B, M, 1)
        feats = feats.to(self.mlp[0].weight.dtype)
        logit = self.mlp(feats).squeeze(-1)  # (B, M)
        return masked_softmax(logit.float(), mask)
