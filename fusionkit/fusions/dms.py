"""Dynamic Modality Scheduling: per-sample weights from confidence, uncertainty and alignment.

For present modalities m: ``h = sum_m w_m z_m`` with ``w = scheduler(scorers(z))`` and the
Modality Weight Consistency Loss ``L_mwcl = mean_b sum_m w_m ||h - z_m||^2``. See DESIGN.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, stack_modalities
from fusionkit.registry import build, component_field, register
from fusionkit.scorers.base import ScoreContext


def mwcl(fused: Tensor, z: Tensor, weights: Tensor) -> Tensor:
    """``mean_b sum_m w_m ||h - z_m||^2`` for the mix ``fused = sum_m w_m z_m`` (rows of w sum to 1).

    For that mix the sum equals ``sum_m w_m ||z_m||^2 - ||h||^2`` (a weighted variance), which
    needs no ``(B, M, d)`` difference tensor. Shapes: ``fused (B, d)``, ``z (B, M, d)``,
    ``weights (B, M)``.
    """
    return ((weights * z.square().sum(-1)).sum(1) - fused.square().sum(-1)).clamp_min(0).mean()


class DMSConfig(FusionConfig):
    scorers: list[Any] = component_field(
        "scorers", ["confidence", "mc_dropout", "alignment"],
        "quality signals; drop one (or zero its coefficient) for an ablation")
    scheduler: Any = component_field(
        "schedulers", {"name": "softmax"}, "softmax (rule) or mlp (learned)")
    mwcl_weight: float = Field(0.1, ge=0, description=(
        "lambda: pulls h towards each z_m in proportion to w_m, so the fused vector stays "
        "interpretable as a mix of unimodal ones"))
    detach_scores: bool = Field(True, description=(
        "stop gradients from the weights into the heads, so the task loss cannot make a head "
        "over-confident to win weight"))


@register("fusions", "dms")
class DMSFusion(Fusion):
    """Dynamic Modality Scheduling: weights from confidence, MC-dropout uncertainty and alignment.

    Example::

        fusion = DMSFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # zi, zt: (B, 128); mask: (B, 2) bool
        loss = F.cross_entropy(head(out.fused), y) + fusion.loss(out, y)
    """

    Config = DMSConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        cfg = self.config
        self.scorers = nn.ModuleList(
            build("scorers", block, f"fusion.scorers.{i}") for i, block in enumerate(cfg.scorers))
        signals = [s.signal for s in self.scorers]
        if len(set(signals)) != len(signals):
            from fusionkit.errors import ConfigError
            raise ConfigError(f"fusion.scorers: two scorers produce the same signal ({signals})")
        self.scheduler = build("schedulers", cfg.scheduler, "fusion.scheduler", signals=signals)

    def forward(self, z: dict[str, Tensor], mask: Tensor | None = None) -> FusionOutput:
        stacked, mask = stack_modalities(z, self.modalities, mask)  # (B, M, d), (B, M)
        hidden = self.heads.hidden(stacked)  # (B, M, h): computed once, reused by MC-dropout
        logits = self.heads.output(F.dropout(hidden, self.heads.dropout, self.training))  # (B, M, K)
        return self.combine(stacked, mask, logits, hidden)

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor, hidden: Tensor | None = None) -> FusionOutput:
        detach = self.config.detach_scores
        if hidden is not None and detach:
            hidden = hidden.detach()
        ctx = ScoreContext(z=z.detach() if detach else z, mask=mask,
                           logits=unimodal_logits.detach() if detach else unimodal_logits,
                           heads=self.heads, hidden=hidden)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            scores = {s.signal: s(ctx) for s in self.scorers}  # each (B, M)
        weights = self.scheduler(scores, mask)  # (B, M), 0 where missing
        fused = torch.einsum("bm,bmd->bd", weights.to(z.dtype), z)  # (B, d)
        losses = {}
        if self.config.mwcl_weight > 0:
            losses["mwcl"] = self.config.mwcl_weight * mwcl(fused.float(), z.float(), weights.float())
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits, mask=mask,
                            z=z, modalities=self.modalities, scores=scores, extra_losses=losses)
