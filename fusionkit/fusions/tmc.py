"""Trusted Multi-view Classification (Han et al., ICLR 2021): Dempster-Shafer fusion of opinions.

Each head's logits give evidence ``e_m = softplus(logits_m)`` (the original code's choice:
smooth and never negative), a Dirichlet ``alpha_m = e_m + 1`` with strength
``S_m = sum_k alpha_mk``, belief ``b_m = e_m / S_m`` and uncertainty ``u_m = K / S_m``
(``sum_k b_mk + u_m = 1``). Present modalities are combined pairwise with the reduced
Dempster-Shafer rule (:func:`ds_combine`); a missing one is the rule's identity (b = 0, u = 1).
The combined opinion maps back to ``S = K / u``, ``alpha = b * S + 1``, and the fusion outputs
``logits = log(alpha / sum(alpha))``, so cross-entropy on them is -log of the expected class
probability. Weights (for reporting and for h) are ``1 - u_m`` normalised over present modalities.

The evidential loss of the paper (expected cross-entropy under each Dirichlet plus a KL term
pulling misleading evidence to zero) is added by :meth:`TMCFusion.loss_terms` for every
present modality and for the combined opinion. The paper anneals the KL coefficient as
``min(1, epoch / 10)``; a fusion does not see the epoch, so ``kl_weight`` is fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput
from fusionkit.errors import ConfigError
from fusionkit.registry import register
from fusionkit.tasks.targets import is_soft

# Floor on the combined uncertainty: a product of many tiny u's would underflow to 0 and make
# S = K / u infinite; 1e-12 still allows alpha up to ~1e12 * K.
_MIN_UNCERTAINTY = 1e-12
# Floor on 1 - u_m before normalising the weights, so a head with no evidence anywhere (all
# present modalities at u ~ 1) still gives rows that sum to 1.
_MIN_BELIEF = 1e-6


def dirichlet_opinion(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Subjective-logic opinion from logits ``(..., K)``.

    Returns:
        ``alpha (..., K)``, belief ``b (..., K)`` and uncertainty ``u (...)`` with
        ``e = softplus(logits)``, ``alpha = e + 1``, ``b = e / S``, ``u = K / S``.
    """
    K = logits.shape[-1]
    evidence = F.softplus(logits)  # (..., K)
    alpha = evidence + 1.0  # (..., K)
    strength = alpha.sum(-1, keepdim=True)  # (..., 1)
    return alpha, evidence / strength, (K / strength).squeeze(-1)


def ds_combine(b1: Tensor, u1: Tensor, b2: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced Dempster-Shafer combination of two opinions.

    With conflict ``C = sum_{i != j} b1_i b2_j``:
    ``b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - C)`` and ``u = u1 * u2 / (1 - C)``.
    ``1 - C`` is evaluated as ``sum_i b1_i b2_i + u2 sum b1 + u1 sum b2 + u1 u2``, equal to it when
    each opinion satisfies ``sum b + u = 1`` but free of the cancellation ``1 - C`` suffers when
    two confident views disagree. The rule is commutative and associative; ``(0, 1)`` is its
    identity.

    Args:
        b1, b2: beliefs ``(..., K)``.
        u1, u2: uncertainties ``(...)``.

    Returns:
        Combined belief ``(..., K)`` and uncertainty ``(...)``.
    """
    u1k, u2k = u1.unsqueeze(-1), u2.unsqueeze(-1)  # (..., 1)
    one_minus_conflict = ((b1 * b2).sum(-1, keepdim=True) + u2k * b1.sum(-1, keepdim=True)
                          + u1k * b2.sum(-1, keepdim=True) + u1k * u2k)  # (..., 1)
    b = (b1 * b2 + b1 * u2k + b2 * u1k) / one_minus_conflict  # (..., K)
    u = (u1k * u2k / one_minus_conflict).squeeze(-1)  # (...)
    return b, u


def combine_opinions(b: Tensor, u: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Fold :func:`ds_combine` over the present modalities of ``b (B, M, K)``, ``u (B, M)``."""
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    b = torch.where(mask.unsqueeze(-1), b, zero)  # (B, M, K), missing -> identity belief 0
    u = torch.where(mask, u, torch.ones((), dtype=u.dtype, device=u.device))  # (B, M), -> 1
    b_acc, u_acc = b[:, 0], u[:, 0]  # (B, K), (B,)
    for m in range(1, b.shape[1]):
        b_acc, u_acc = ds_combine(b_acc, u_acc, b[:, m], u[:, m])
    return b_acc, u_acc


def opinion_to_alpha(b: Tensor, u: Tensor) -> Tensor:
    """Dirichlet parameters ``alpha = b * S + 1`` with ``S = K / u``: ``(..., K)``."""
    K = b.shape[-1]
    strength = K / u.clamp_min(_MIN_UNCERTAINTY).unsqueeze(-1)  # (..., 1)
    return b * strength + 1.0


def evidential_loss(alpha: Tensor, target: Tensor, kl_weight: float) -> Tensor:
    """TMC's per-sample loss for Dirichlet ``alpha (N, K)`` and labels ``target (N,)``: ``(N,)``.

    ``sum_k y_k (digamma(S) - digamma(alpha_k)) + kl_weight * KL(Dir(alpha~) || Dir(1))`` with
    ``alpha~ = y + (1 - y) * alpha`` (the evidence for the true class removed, so the KL only
    penalises evidence for wrong classes).
    """
    K = alpha.shape[-1]
    y = F.one_hot(target, K).to(alpha.dtype)  # (N, K)
    strength = alpha.sum(-1)  # (N,)
    expected_ce = (y * (torch.digamma(strength).unsqueeze(-1) - torch.digamma(alpha))).sum(-1)  # (N,)
    alpha_t = y + (1 - y) * alpha  # (N, K)
    strength_t = alpha_t.sum(-1)  # (N,)
    kl = (torch.lgamma(strength_t) - math.lgamma(K) - torch.lgamma(alpha_t).sum(-1)
          + ((alpha_t - 1) * (torch.digamma(alpha_t) - torch.digamma(strength_t).unsqueeze(-1))).sum(-1))
    return expected_ce + kl_weight * kl


class TMCConfig(FusionConfig):
    tmc_weight: float = Field(1.0, ge=0, description=(
        "weight of the evidential loss (per-modality plus combined); it is what makes each "
        "head's evidence, hence its uncertainty, meaningful"))
    kl_weight: float = Field(0.1, ge=0, description=(
        "coefficient of the KL term inside the evidential loss; a fixed stand-in for the "
        "paper's annealed min(1, epoch / 10), which a fusion cannot see"))


@register("fusions", "tmc")
class TMCFusion(Fusion):
    """Trusted Multi-view Classification: Dempster-Shafer combination of per-modality Dirichlets.

    Example::

        fusion = TMCFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.logits: (B, 10)
        loss = F.cross_entropy(out.logits, y) + fusion.loss(out, y)   # includes "tmc"
    """

    Config = TMCConfig

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        _, b_m, u_m = dirichlet_opinion(unimodal_logits.float())  # (B, M, K), (B, M)
        b, u = combine_opinions(b_m, u_m, mask)  # (B, K), (B,)
        alpha = opinion_to_alpha(b, u)  # (B, K)
        logits = alpha.log() - alpha.sum(-1, keepdim=True).log()  # (B, K), log E[p]
        belief = torch.where(mask, b_m.sum(-1).clamp_min(_MIN_BELIEF),
                             torch.zeros((), dtype=b_m.dtype, device=b_m.device))  # (B, M), 1 - u_m
        weights = belief / belief.sum(1, keepdim=True)  # (B, M)
        fused = (weights.unsqueeze(-1).to(z.dtype) * z).sum(1)  # (B, d)
        uncertainty = torch.where(mask, u_m, torch.ones((), dtype=u_m.dtype, device=u_m.device))
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits,
                            mask=mask, z=z, modalities=self.modalities, logits=logits,
                            scores={"uncertainty": uncertainty.detach()})

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        """Base terms plus ``tmc``: evidential loss of each present modality and of the combination."""
        if is_soft(target):
            raise ConfigError("fusion tmc needs single-label targets (one class per sample); this task's "
                              "probe targets are soft (captioning, retrieval): choose another fusion, e.g. dms")
        terms = super().loss_terms(out, target)
        B, M, K = out.unimodal_logits.shape
        alpha_m, b_m, u_m = dirichlet_opinion(out.unimodal_logits.float())  # (B, M, K), (B, M)
        per_view = evidential_loss(alpha_m.reshape(B * M, K), target.repeat_interleave(M),
                                   self.config.kl_weight).view(B, M)  # (B, M)
        per_view = torch.where(out.mask, per_view,
                               torch.zeros((), dtype=per_view.dtype, device=per_view.device))
        views = (per_view.sum(0) / out.mask.sum(0).clamp(min=1)).sum()  # sum over modalities
        alpha = opinion_to_alpha(*combine_opinions(b_m, u_m, out.mask))  # (B, K)
        combined = evidential_loss(alpha, target, self.config.kl_weight).mean()
        terms["tmc"] = self.config.tmc_weight * (views + combined)
        return terms
