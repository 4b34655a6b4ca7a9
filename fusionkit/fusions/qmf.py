"""Quality-aware Multimodal Fusion (Zhang et al., ICML 2023): energy-weighted decision fusion.

Each head's confidence is its negative free energy,
``c_m = -E_m = T * logsumexp(logits_m / T)`` (high when the logits are large and peaked).
Weights are ``w = masked_softmax(stopgrad(c) / tau)`` and the fused decision is
``logits = sum_m w_m logits_m`` (the model skips its decoder); ``h = sum_m w_m z_m``.
The paper multiplies the logits by the raw ``c_m / 10``; the softmax keeps the weights
a distribution (rows sum to 1, exactly 0 where missing), as every fusion here reports them.

The paper's regulariser ranks each modality's confidence by its samples' historical
correctness. A fusion sees one batch at a time, so the history is replaced by the current
unimodal loss: for modality m and samples i, j that both have it, if ``loss_i < loss_j`` then
``c_i`` should exceed ``c_j`` (margin ranking loss, margin 0), averaged over such pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, masked_softmax
from fusionkit.errors import ConfigError
from fusionkit.registry import register
from fusionkit.tasks.targets import is_soft


def energy_confidence(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` over the last dim: ``(..., K) -> (...)``."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


def ranking_loss(confidence: Tensor, sample_loss: Tensor, mask: Tensor) -> Tensor:
    """Mean margin ranking loss (margin 0) over in-batch pairs that share a modality.

    For every modality m and samples i != j both having m with ``sample_loss[i, m] <
    sample_loss[j, m]``, penalise ``max(0, c[j, m] - c[i, m])``. Ties and missing entries
    contribute nothing; a batch with no valid pair gives 0.

    Args:
        confidence: ``(B, M)``, gradients flow into it.
        sample_loss: ``(B, M)`` per-sample unimodal losses (treated as constants).
        mask: ``(B, M)`` presence.
    """
    B, M = confidence.shape
    c_i = confidence.unsqueeze(1).expand(B, B, M)  # (B, B, M): [i, j, m] = c[i, m]
    c_j = confidence.unsqueeze(0).expand(B, B, M)  # (B, B, M): [i, j, m] = c[j, m]
    sample_loss = sample_loss.detach()
    # (B, B, M): [i, j, m] = +1 if loss_i < loss_j, -1 if greater, 0 on a tie
    order = torch.sign(sample_loss.unsqueeze(0) - sample_loss.unsqueeze(1))
    valid = mask.unsqueeze(1) & mask.unsqueeze(0) & (order != 0)  # (B, B, M)
    order = torch.where(valid, order, torch.zeros((), dtype=order.dtype, device=order.device))
    pair = F.margin_ranking_loss(c_i, c_j, order.to(confidence.dtype), margin=0.0, reduction="none")
    pair = torch.where(valid, pair, torch.zeros((), dtype=pair.dtype, device=pair.device))
    return pair.sum() / valid.sum().clamp(min=1)


class QMFConfig(FusionConfig):
    energy_temperature: float = Field(1.0, gt=0, description=(
        "T in the energy -T logsumexp(logits / T); the paper (and energy OOD scores) use 1"))
    weight_temperature: float = Field(1.0, gt=0, description=(
        "tau in softmax(c / tau) over modalities; larger spreads weight more evenly"))
    rank_weight: float = Field(0.1, ge=0, description=(
        "weight of the ranking regulariser that ties each head's confidence to how well it "
        "actually does on the sample; 0 turns it off"))


@register("fusions", "qmf")
class QMFFusion(Fusion):
    """Quality-aware decision fusion: logits = sum_m softmax(energy confidence)_m * logits_m.

    Example::

        fusion = QMFFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.logits: (B, 10)
        loss = F.cross_entropy(out.logits, y) + fusion.loss(out, y)   # includes "rank"
    """

    Config = QMFConfig

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        cfg = self.config
        confidence = energy_confidence(unimodal_logits.detach().float(), cfg.energy_temperature)  # (B, M)
        weights = masked_softmax(confidence / cfg.weight_temperature, mask)  # (B, M)
        present = torch.where(mask.unsqueeze(-1), unimodal_logits,
                              torch.zeros((), dtype=unimodal_logits.dtype, device=unimodal_logits.device))
        logits = (weights.unsqueeze(-1).to(present.dtype) * present).sum(1)  # (B, M, K) -> (B, K)
        fused = (weights.unsqueeze(-1).to(z.dtype) * z).sum(1)  # (B, d)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities, logits=logits,
                            scores={"confidence": confidence})

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        """Base terms plus ``rank``: the confidence ranking regulariser (needs the targets)."""
        if is_soft(target):
            raise ConfigError("fusion qmf needs single-label targets (one class per sample); this task's "
                              "probe targets are soft (captioning, retrieval): choose another fusion, e.g. dms")
        terms = super().loss_terms(out, target)
        if self.config.rank_weight > 0:
            B, M, K = out.unimodal_logits.shape
            logits = out.unimodal_logits.float()  # (B, M, K)
            confidence = energy_confidence(logits, self.config.energy_temperature)  # (B, M)
            sample_loss = F.cross_entropy(logits.reshape(B * M, K), target.repeat_interleave(M),
                                          reduction="none").view(B, M)  # (B, M)
            terms["rank"] = self.config.rank_weight * ranking_loss(confidence, sample_loss, out.mask)
        return terms
