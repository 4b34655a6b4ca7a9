"""MICINet (Zhang, Shen, Chen; arXiv 2502.19674): inter-class confusing information removed, then compensated.

For each present modality m of a sample, with head probabilities ``q_m = softmax(logits_m)``
(detached) over K classes and the P = K(K-1)/2 unordered class pairs p = (c, c'):

- global ICI: per modality and pair, a learned confusing direction ``u_mp`` (unit after
  normalisation) and a learned global confusion degree ``beta_mp = sigmoid(b_mp)`` in (0, 1);
- global-guided sample ICI removal: the sample's pair probabilities ``pi_mp = 2 q_mc q_mc'``
  (they sum to the Gini impurity ``1 - sum_k q_mk^2``: a confident head removes little) weight
  rank-one projections, ``z~_m = z_m - sum_p beta_mp pi_mp (z_m . u_mp) u_mp``. Since
  ``sum_p beta pi < 1 - 1/K`` the operator ``I - sum_p beta pi u u^T`` has eigenvalues in
  ``(1/K, 1]``: it shrinks confusing components, never flips or amplifies them;
- relative discriminative power: the margin ``delta_m = q_m(1) - q_m(2)`` between the two
  largest probabilities, ``rho_m = delta_m / sum_{j present} delta_j`` (uniform over the present
  modalities when every margin is 0);
- sample-adaptive cross-modality compensation: ``zhat_m = z~_m + W (sum_{j != m} rho_j z~_j)
  + (1 - rho_m) b``, i.e. ``(1 - rho_m) T(c_m)`` with ``T(x) = W x + b`` (identity at init) and
  ``c_m`` the power-weighted mean of the other modalities: the less discriminative a modality,
  the more the others fill it in;
- ``w = rho``, ``h = sum_m rho_m zhat_m``.

The class pairs are indexed by the K classes, so the fusion needs single-label targets.
docs/fusions.md lists every choice made where the paper is silent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.errors import ConfigError
from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, uniform_weights
from fusionkit.registry import register
from fusionkit.tasks.targets import is_soft

_SOFT_TARGETS = ("fusion micinet needs single-label targets (one class per sample); this task's probe "
                 "targets are soft (captioning, retrieval): choose another fusion, e.g. dms")


def pair_probabilities(probs: Tensor) -> Tensor:
    """``pi_p = 2 q_c q_c'`` for the unordered pairs c < c' (``torch.triu_indices`` order):
    ``(..., K) -> (..., K(K-1)/2)``."""
    i, j = torch.triu_indices(probs.shape[-1], probs.shape[-1], 1, device=probs.device)  # (P,) each
    return 2.0 * probs[..., i] * probs[..., j]


def remove_confusion(z: Tensor, strength: Tensor, directions: Tensor) -> Tensor:
    """``z - sum_p strength_p (z . u_p) u_p`` with ``u_p`` the unit ``directions``.

    Shapes: ``z (B, M, d)``, ``strength (B, M, P)``, ``directions (M, P, d)`` -> ``(B, M, d)``.
    """
    u = F.normalize(directions, dim=-1, eps=1e-8).to(z.dtype)  # (M, P, d)
    proj = torch.einsum("bmd,mpd->bmp", z, u)  # (B, M, P): z . u_p
    return z - torch.einsum("bmp,mpd->bmd", strength.to(z.dtype) * proj, u)


def relative_power(probs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Margins ``delta = q(1) - q(2)`` and ``rho = delta / sum_present delta``: ``(B, M)`` each.

    ``rho`` is exactly 0 where a modality is missing and uniform over the present ones when all
    their margins are 0. ``probs (B, M, K)``, ``mask (B, M)``.
    """
    top = probs.topk(2, dim=-1).values  # (B, M, 2)
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    margin = torch.where(mask, top[..., 0] - top[..., 1], zero)  # (B, M)
    total = margin.sum(1, keepdim=True)  # (B, 1)
    rho = torch.where(total > 0, margin / total.clamp_min(torch.finfo(total.dtype).tiny),
                      uniform_weights(mask, probs.dtype))  # (B, M)
    return margin, rho


def compensate(z: Tensor, rho: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``zhat_m = z_m + W (sum_{j != m} rho_j z_j) + (1 - rho_m) b``: ``(B, M, d)``.

    ``z (B, M, d)`` (missing rows zero), ``rho (B, M)`` (0 where missing), ``weight (d, d)``,
    ``bias (d,)``. With one present modality (rho = 1) the sum is empty and zhat = z.
    """
    rz = rho.unsqueeze(-1).to(z.dtype) * z  # (B, M, d)
    others = rz.sum(1, keepdim=True) - rz  # (B, M, d): sum over the other modalities
    return z + others @ weight.T.to(z.dtype) + (1.0 - rho).unsqueeze(-1).to(z.dtype) * bias.to(z.dtype)


class MICINetConfig(FusionConfig):
    removal: bool = Field(True, description=(
        "remove global-guided inter-class confusing information (off: the paper's ablation "
        "without the global modules)"))
    compensation: bool = Field(True, description=(
        "cross-modality compensation weighted by relative discriminative power (off: "
        "h = sum_m rho_m z~_m, the ablation without it)"))


@register("fusions", "micinet")
class MICINetFusion(Fusion):
    """MICINet: class-pair confusing directions removed per sample, then cross-modality compensation.

    Example::

        fusion = MICINetFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.weights: relative discriminative power
        loss = F.cross_entropy(head(out.fused), y) + fusion.loss(out, y)
    """

    Config = MICINetConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        M, P = len(self.modalities), num_classes * (num_classes - 1) // 2
        # global ICI directions, unit-scale (only their direction is used; a short vector turns faster under Adam)
        self.directions = nn.Parameter(torch.randn(M, P, dim) / math.sqrt(dim))  # (M, P, d)
        self.degree = nn.Parameter(torch.zeros(M, P))  # (M, P): beta = sigmoid(.), 0.5 at init
        self.comp_w = nn.Parameter(torch.eye(dim))  # (d, d): T starts as the identity
        self.comp_b = nn.Parameter(torch.zeros(dim))  # (d,)

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        if unimodal_logits.shape[-1] != self.num_classes:  # heads mapped to retrieval candidates
            raise ConfigError(_SOFT_TARGETS)
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        probs = unimodal_logits.detach().float().softmax(-1)  # (B, M, K)
        strength = torch.sigmoid(self.degree.float()) * pair_probabilities(probs)  # (B, M, P)
        clean = remove_confusion(z, strength, self.directions) if self.config.removal else z  # (B, M, d)
        margin, rho = relative_power(probs, mask)  # (B, M) each
        if self.config.compensation:
            clean = compensate(clean, rho, self.comp_w, self.comp_b)  # (B, M, d)
        parts = torch.where(mask.unsqueeze(-1), clean, zero)  # (B, M, d)
        fused = (rho.unsqueeze(-1).to(z.dtype) * parts).sum(1)  # (B, d)
        fzero = torch.zeros((), dtype=strength.dtype, device=z.device)
        scores = {"margin": margin, "confusion": torch.where(mask, strength.sum(-1), fzero).detach()}
        return FusionOutput(fused=fused, weights=rho, unimodal_logits=unimodal_logits, mask=mask,
                            z=z, modalities=self.modalities, scores=scores)

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        if is_soft(target):
            raise ConfigError(_SOFT_TARGETS)
        return super().loss_terms(out, target)
