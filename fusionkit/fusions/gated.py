"""Gated (mixture-of-experts) fusion: a gate reads every modality at once and picks the mix.

``g = MLP([z_1; ...; z_M; mask])`` gives M logits, ``w = masked_softmax(g)``, and each
modality passes through its own linear expert ``E_m`` before the weighted sum
``h = sum_m w_m E_m(z_m)``. Missing modalities enter the gate as zeros and the mask tells it
which zeros are absences.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, masked_softmax
from fusionkit.registry import register


class GatedConfig(FusionConfig):
    gate_hidden: int = Field(128, ge=1, description=(
        "hidden width of the gating MLP; it sees all M*d inputs, so it is wider than a "
        "per-modality scorer"))
    gate_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "dropout inside the gating MLP; off by default since the gate is small"))


@register("fusions", "gated")
class GatedFusion(Fusion):
    """Mixture of experts: w = masked_softmax(MLP([z; mask])); h = sum_m w_m E_m(z_m).

    Example::

        fusion = GatedFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.fused: (B, 128)
    """

    Config = GatedConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        cfg = self.config
        M = len(self.modalities)
        self.gate = nn.Sequential(
            nn.Linear(M * dim + M, cfg.gate_hidden), nn.GELU(),
            nn.Dropout(cfg.gate_dropout), nn.Linear(cfg.gate_hidden, M))
        # M experts stacked as (M, d, d) so they all run in one einsum
        self.expert_w = nn.Parameter(torch.empty(M, dim, dim))
        self.expert_b = nn.Parameter(torch.zeros(M, dim))
        for m in range(M):  # same init as nn.Linear, per modality
            nn.init.kaiming_uniform_(self.expert_w.data[m].T, a=math.sqrt(5))

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        B, M, d = z.shape
        gate_in = torch.cat([z.reshape(B, M * d), mask.to(z.dtype)], dim=1)  # (B, M*d + M)
        gate_logits = self.gate(gate_in)  # (B, M)
        weights = masked_softmax(gate_logits, mask)  # (B, M), 0 where missing
        experts = torch.einsum("bmd,mde->bme", z, self.expert_w) + self.expert_b  # (B, M, d)
        experts = torch.where(mask.unsqueeze(-1), experts,
                              torch.zeros((), dtype=experts.dtype, device=experts.device))
        fused = (weights.unsqueeze(-1).to(experts.dtype) * experts).sum(1)  # (B, d)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities)
