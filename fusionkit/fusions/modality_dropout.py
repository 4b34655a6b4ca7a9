"""Modality dropout: train any fusion with whole modalities randomly hidden.

During training each present modality of each sample is dropped with probability ``p``;
a sample that would lose all of them keeps one, chosen uniformly among its present ones.
The perturbed mask is handed to the wrapped fusion, which then zeroes the dropped rows as
if they were missing. In eval mode the wrapper is exactly the wrapped fusion.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, stack_modalities
from fusionkit.registry import build, component_field, register


def drop_modalities(mask: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each present entry of ``mask`` ``(B, M)`` with probability ``p``, never a whole row.

    A row left empty gets back one of its originally present modalities, chosen uniformly.
    Every row of ``mask`` must have at least one True entry.

    Args:
        mask: presence mask ``(B, M)`` bool.
        p: drop probability in [0, 1].
        generator: optional RNG, for reproducible tests.

    Returns:
        The perturbed mask ``(B, M)``, a subset of ``mask`` with no empty row.
    """
    noise = torch.rand(mask.shape, generator=generator, device=mask.device)  # (B, M)
    kept = mask & (noise >= p)  # (B, M)
    # a uniform pick among the present modalities: argmax of fresh noise restricted to mask
    pick_noise = torch.rand(mask.shape, generator=generator, device=mask.device)  # (B, M)
    pick = pick_noise.masked_fill(~mask, -1.0).argmax(dim=1)  # (B,)
    rescue = torch.zeros_like(mask).scatter_(1, pick.unsqueeze(1), True)  # (B, M), one-hot
    empty = ~kept.any(dim=1, keepdim=True)  # (B, 1)
    return torch.where(empty, rescue, kept)


class ModalityDropoutConfig(FusionConfig):
    """The wrapper's own head fields (``aux_weight``, ``head_*``) are unused: the heads and the
    auxiliary loss belong to the wrapped fusion, so set them inside ``base``."""

    base: Any = component_field(
        "fusions", {"name": "mean"},
        "the fusion to wrap (any registered one, with its own parameters)")
    p: float = Field(0.3, ge=0, lt=1, description=(
        "chance that each present modality of a sample is hidden during training, so the "
        "model learns to cope when it is really missing; below 1 so some signal always remains"))


@register("fusions", "modality_dropout")
class ModalityDropoutFusion(Fusion):
    """Wrapper: during training, hide each present modality with probability p, then run ``base``.

    Example::

        fusion = build("fusions", {"name": "modality_dropout", "p": 0.3, "base": {"name": "dms"}},
                       modalities=["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.mask: the mask base fusion saw
    """

    Config = ModalityDropoutConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        # the base class always builds heads; the wrapped fusion owns the ones that are used
        del self.heads
        self.inner = build("fusions", self.config.base, "fusion.base", modalities=self.modalities,
                           dim=dim, num_classes=num_classes)

    @property
    def heads(self):
        """The wrapped fusion's unimodal heads."""
        return self.inner.heads

    def forward(self, z: dict[str, Tensor], mask: Tensor | None = None) -> FusionOutput:
        """Perturb ``mask`` (training only) and run the wrapped fusion on it."""
        if self.training and self.config.p > 0:
            _, mask = stack_modalities(z, self.modalities, mask)  # checks shape, no empty row
            mask = drop_modalities(mask, self.config.p)  # (B, M)
        return self.inner(z, mask)

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        return self.inner.combine(z, mask, unimodal_logits)

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        return self.inner.loss_terms(out, target)
