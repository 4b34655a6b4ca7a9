"""MICINet (Zhang, Shen, Chen; arXiv 2502.19674): inter-class confusing information removed, then compensated.

For each present modality m of a sample, with head probabilities ``q_m = softmax(logits_m)``
(detached) over K classes and the P = K(K-1)/2 unordered class pairs p = (c, c'):

- global ICI learning (``gici: paper``): a dual path per modality on the detached ``z_m``, a
  specific code ``s_m = E^s_m(z_m)`` and a shared code ``c_m = E^c_m(z_m)`` (each r wide) and a
  linear decoder ``D_m(s, c) = s A_m + c C_m + b_m``, trained by reconstruction, a classifier on
  ``s`` and an alignment that makes the shared codes of every class pair coincide. Running class
  moments of ``c`` give per pair the Gaussian ``N(mu_mp, var_mp)`` of the confusing information
  (the moment-matched equal mixture of classes c and c'), and running head confusion gives the
  confusion degree ``beta_mp``: the global ICI is the mixture ``sum_p alpha_mp N(mu_mp, var_mp)``,
  ``alpha = beta / sum_p beta``;
- global-guided sample ICI removal: the responsibilities ``gamma_mp`` of the sample's shared code
  under that mixture give its expected confusing code ``e_m = sum_p gamma_mp mu_mp``, removed in
  proportion to the head's Gini impurity ``G_m = sum_p 2 q_mc q_mc' = 1 - sum_k q_mk^2``:
  ``z~_m = z_m - G_m e_m C_m``. ``gici: direction`` keeps the earlier reduction to one learned
  direction and degree per pair (``z~ = z - sum_p beta_mp pi_mp (z . u_mp) u_mp``);
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
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.errors import ConfigError
from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, masked_unimodal_loss, uniform_weights
from fusionkit.registry import register
from fusionkit.tasks.targets import has_label, is_soft

_SOFT_TARGETS = ("fusion micinet needs single-label targets (one class per sample); this task's probe "
                 "targets are soft (captioning, retrieval): choose another fusion, e.g. dms")


def pair_probabilities(probs: Tensor) -> Tensor:
    """``pi_p = 2 q_c q_c'`` for the unordered pairs c < c' (``torch.triu_indices`` order):
    ``(..., K) -> (..., K(K-1)/2)``."""
    i, j = torch.triu_indices(probs.shape[-1], probs.shape[-1], 1, device=probs.device)  # (P,) each
    return 2.0 * probs[..., i] * probs[..., j]


def pair_gaussians(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Per class pair, the Gaussian moment-matched to the equal mixture of its two classes.

    ``mu_p = (mu_c + mu_c') / 2``, ``var_p = (var_c + var_c') / 2 + ((mu_c - mu_c') / 2)^2``
    (diagonal). ``mean, var (..., K, r) -> (..., P, r)`` each, pairs in ``triu_indices`` order.
    """
    i, j = torch.triu_indices(mean.shape[-2], mean.shape[-2], 1, device=mean.device)  # (P,) each
    mu = 0.5 * (mean[..., i, :] + mean[..., j, :])  # (..., P, r)
    return mu, 0.5 * (var[..., i, :] + var[..., j, :]) + (0.5 * (mean[..., i, :] - mean[..., j, :])).square()


def mixture_responsibilities(code: Tensor, degree: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """Posterior over the mixture's components ``gamma_p ~ alpha_p N(code; mu_p, diag var_p)``.

    ``alpha = degree / sum_p degree`` (the confusion degrees as mixing weights; floored at 1e-12
    so that a pair whose heads never confuse it keeps a finite log-weight). Shapes:
    ``code (B, M, r)``, ``degree (M, P)``, ``mu, var (M, P, r)`` -> ``(B, M, P)``.
    """
    degree = degree.clamp_min(1e-12)  # (M, P)
    log_alpha = torch.log(degree / degree.sum(-1, keepdim=True))  # (M, P)
    sq = (code.unsqueeze(2) - mu).square() / var  # (B, M, P, r)
    log_density = -0.5 * (sq.sum(-1) + var.log().sum(-1))  # (B, M, P); 2 pi cancels in the softmax
    return torch.softmax(log_alpha + log_density, dim=-1)


def remove_distribution(z: Tensor, amount: Tensor, gamma: Tensor, mu: Tensor, decoder: Tensor) -> Tensor:
    """``z - amount * (sum_p gamma_p mu_p) C``: the expected confusing code, decoded into z's space.

    Shapes: ``z (B, M, d)``, ``amount (B, M)``, ``gamma (B, M, P)``, ``mu (M, P, r)``, ``decoder``
    (the shared block ``C``) ``(M, r, d)`` -> ``(B, M, d)``.
    """
    code = torch.einsum("bmp,mpr->bmr", gamma, mu)  # (B, M, r): E[ICI code | sample]
    ici = torch.einsum("bmr,mrd->bmd", amount.unsqueeze(-1) * code, decoder)  # (B, M, d)
    return z - ici.to(z.dtype)


def remove_confusion(z: Tensor, strength: Tensor, directions: Tensor) -> Tensor:
    """``z - sum_p strength_p (z . u_p) u_p`` with ``u_p`` the unit ``directions`` (``gici: direction``).

    Shapes: ``z (B, M, d)``, ``strength (B, M, P)``, ``directions (M, P, d)`` -> ``(B, M, d)``.
    """
    u = F.normalize(directions, dim=-1, eps=1e-8).to(z.dtype)  # (M, P, d)
    proj = torch.einsum("bmd,mpd->bmp", z, u)  # (B, M, P): z . u_p
    return z - torch.einsum("bmp,mpd->bmd", strength.to(z.dtype) * proj, u)


def shared_alignment(code: Tensor, target: Tensor, keep: Tensor, num_classes: int) -> Tensor:
    """Between-class share of the shared codes' scatter, averaged over modalities: a scalar in [0, 1].

    ``sum_k n_k |mu_k - mu|^2 / sum_i |c_i - mu|^2`` per modality, over the samples ``keep``
    ``(B, M)``; the numerator equals ``sum_{c < c'} n_c n_c' |mu_c - mu_c'|^2 / N``, every class
    pair's mismatch of shared information at O(K) cost. ``code (B, M, r)``, ``target (B,)``.
    """
    w = keep.to(code.dtype)  # (B, M)
    onehot = F.one_hot(target.clamp_min(0), num_classes).to(code.dtype)  # (B, K)
    count = torch.einsum("bm,bk->mk", w, onehot)  # (M, K)
    sums = torch.einsum("bm,bk,bmr->mkr", w, onehot, code)  # (M, K, r)
    n = count.sum(-1)  # (M,)
    mean = sums.sum(1) / n.clamp_min(1).unsqueeze(-1)  # (M, r)
    class_mean = sums / count.clamp_min(1).unsqueeze(-1)  # (M, K, r)
    between = (count.unsqueeze(-1) * (class_mean - mean.unsqueeze(1)).square()).sum((1, 2))  # (M,)
    total = (w.unsqueeze(-1) * (code - mean).square()).sum((0, 2))  # (M,)
    ratio = between / total.clamp_min(1e-8)  # (M,)
    return torch.where(n > 1, ratio, torch.zeros_like(ratio)).sum() / code.shape[1]


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
        "without the global modules, and no GICI losses)"))
    compensation: bool = Field(True, description=(
        "cross-modality compensation weighted by relative discriminative power (off: "
        "h = sum_m rho_m z~_m, the ablation without it)"))
    gici: Literal["paper", "direction"] = Field("paper", description=(
        "global ICI: paper = dual-path encoders and decoder, a Gaussian per class pair mixed by "
        "confusion degrees, with its losses; direction = one learned direction and degree per "
        "pair, task loss only (the earlier, cheaper reduction)"))
    gici_dim: int = Field(32, ge=1, description=(
        "r: width of the specific and the shared code; below d so that neither path alone can "
        "reconstruct z and the shared path cannot collapse to a constant"))
    gici_weight: float = Field(1.0, ge=0, description=(
        "weight of each GICI loss (reconstruction, specific classification, shared alignment)"))
    gici_momentum: float = Field(0.1, gt=0, le=1, description=(
        "momentum of the running class moments of the shared codes and of the confusion degrees: "
        "the global distribution is a dataset statistic, a batch is only a sample of it"))


@register("fusions", "micinet")
class MICINetFusion(Fusion):
    """MICINet: the learned global ICI mixture removed per sample, then cross-modality compensation.

    Example::

        fusion = MICINetFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.weights: relative discriminative power
        loss = F.cross_entropy(head(out.fused), y) + fusion.loss(out, y)   # includes gici_* terms
    """

    Config = MICINetConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        M, P, K, r = len(self.modalities), num_classes * (num_classes - 1) // 2, num_classes, self.config.gici_dim
        if self.config.gici == "direction":
            # unit-scale directions (only their direction is used; a short vector turns faster under Adam)
            self.directions = nn.Parameter(torch.randn(M, P, dim) / math.sqrt(dim))  # (M, P, d)
            self.degree = nn.Parameter(torch.zeros(M, P))  # (M, P): beta = sigmoid(.), 0.5 at init
        else:
            # dual path, all modalities stacked so each step is one einsum; nn.Linear's init scale
            self.spec_w = nn.Parameter(torch.empty(M, dim, r).uniform_(-1, 1) / math.sqrt(dim))  # (M, d, r)
            self.spec_b = nn.Parameter(torch.zeros(M, r))  # (M, r)
            self.shared_w = nn.Parameter(torch.empty(M, dim, r).uniform_(-1, 1) / math.sqrt(dim))  # (M, d, r)
            self.shared_b = nn.Parameter(torch.zeros(M, r))  # (M, r)
            self.dec_w = nn.Parameter(torch.empty(M, 2 * r, dim).uniform_(-1, 1) / math.sqrt(2 * r))  # (M, 2r, d)
            self.dec_b = nn.Parameter(torch.zeros(M, dim))  # (M, d)
            self.spec_head = nn.Parameter(torch.empty(M, r, K).uniform_(-1, 1) / math.sqrt(r))  # (M, r, K)
            # the global ICI: running class moments of the shared codes and pair confusion degrees,
            # uninformative at init (unit Gaussians, every pair as confused as uniform heads)
            self.register_buffer("class_mean", torch.zeros(M, K, r))
            self.register_buffer("class_var", torch.ones(M, K, r))
            self.register_buffer("confusion", torch.full((M, P), 2.0 / K ** 2))
        self.comp_w = nn.Parameter(torch.eye(dim))  # (d, d): T starts as the identity
        self.comp_b = nn.Parameter(torch.zeros(dim))  # (d,)

    def codes(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Specific and shared codes of the detached ``z (B, M, d)``: ``(B, M, r)`` each."""
        x = z.detach().float()
        s = torch.einsum("bmd,mdr->bmr", x, self.spec_w) + self.spec_b  # (B, M, r)
        c = torch.einsum("bmd,mdr->bmr", x, self.shared_w) + self.shared_b  # (B, M, r)
        return s, c

    def global_ici(self) -> tuple[Tensor, Tensor]:
        """The per-pair Gaussians ``mu, var (M, P, r)`` from the running class moments."""
        return pair_gaussians(self.class_mean, self.class_var.clamp_min(1e-4))

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        if unimodal_logits.shape[-1] != self.num_classes:  # heads mapped to retrieval candidates
            raise ConfigError(_SOFT_TARGETS)
        cfg = self.config
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        probs = unimodal_logits.detach().float().softmax(-1)  # (B, M, K)
        pi = pair_probabilities(probs)  # (B, M, P)
        if cfg.gici == "direction":
            strength = torch.sigmoid(self.degree.float()) * pi  # (B, M, P)
            confusion = strength.sum(-1)  # (B, M)
            clean = remove_confusion(z, strength, self.directions) if cfg.removal else z  # (B, M, d)
        else:
            confusion = pi.sum(-1)  # (B, M): Gini impurity of the head
            clean = z
            if cfg.removal:
                mu, var = self.global_ici()  # (M, P, r) each
                gamma = mixture_responsibilities(self.codes(z)[1], self.confusion, mu, var)  # (B, M, P)
                clean = remove_distribution(z, confusion, gamma, mu, self.dec_w[:, cfg.gici_dim:])  # (B, M, d)
        margin, rho = relative_power(probs, mask)  # (B, M) each
        if cfg.compensation:
            clean = compensate(clean, rho, self.comp_w, self.comp_b)  # (B, M, d)
        parts = torch.where(mask.unsqueeze(-1), clean, zero)  # (B, M, d)
        fused = (rho.unsqueeze(-1).to(z.dtype) * parts).sum(1)  # (B, d)
        fzero = torch.zeros((), dtype=confusion.dtype, device=z.device)
        scores = {"margin": margin, "confusion": torch.where(mask, confusion, fzero).detach()}
        return FusionOutput(fused=fused, weights=rho, unimodal_logits=unimodal_logits, mask=mask,
                            z=z, modalities=self.modalities, scores=scores)

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        """Base terms plus, for ``gici: paper``, ``gici_rec``, ``gici_spec`` and ``gici_share``."""
        if is_soft(target):
            raise ConfigError(_SOFT_TARGETS)
        terms = super().loss_terms(out, target)
        cfg = self.config
        if cfg.gici != "paper" or not cfg.removal or cfg.gici_weight == 0:
            return terms
        s, c = self.codes(out.z)  # (B, M, r) each
        recon = torch.einsum("bmr,mrd->bmd", torch.cat([s, c], -1), self.dec_w) + self.dec_b  # (B, M, d)
        err = (recon - out.z.detach().float()).square().mean(-1)  # (B, M)
        present = out.mask.float()  # (B, M)
        rec = ((err * present).sum(0) / present.sum(0).clamp_min(1)).sum()
        keep = out.mask & has_label(target).unsqueeze(1)  # (B, M)
        spec = masked_unimodal_loss(torch.einsum("bmr,mrk->bmk", s, self.spec_head), target, out.mask)
        terms["gici_rec"] = cfg.gici_weight * rec
        terms["gici_spec"] = cfg.gici_weight * spec
        terms["gici_share"] = cfg.gici_weight * shared_alignment(c, target, keep, self.num_classes)
        if self.training:
            self.update_global_ici(c.detach(), out.unimodal_logits.detach().float().softmax(-1), target, keep)
        return terms

    @torch.no_grad()
    def update_global_ici(self, code: Tensor, probs: Tensor, target: Tensor, keep: Tensor) -> None:
        """Move the running class moments and pair confusion degrees towards this batch's.

        ``code (B, M, r)``, ``probs (B, M, K)``, ``target (B,)``, ``keep (B, M)``; only the
        modalities and classes (pairs) that have samples in the batch move.
        """
        K, mom = self.num_classes, self.config.gici_momentum
        w = keep.to(code.dtype)  # (B, M)
        onehot = F.one_hot(target.clamp_min(0), K).to(code.dtype)  # (B, K)
        count = torch.einsum("bm,bk->mk", w, onehot)  # (M, K)
        mean = torch.einsum("bm,bk,bmr->mkr", w, onehot, code) / count.clamp_min(1).unsqueeze(-1)  # (M, K, r)
        sq = torch.einsum("bm,bk,bmr->mkr", w, onehot, code.square()) / count.clamp_min(1).unsqueeze(-1)
        seen = (count > 0).unsqueeze(-1)  # (M, K, 1)
        self.class_mean.copy_(torch.where(seen, self.class_mean.lerp(mean, mom), self.class_mean))
        self.class_var.copy_(torch.where(seen, self.class_var.lerp((sq - mean.square()).clamp_min(0), mom),
                                         self.class_var))
        # confusion degree of (c, c'): mean pair probability pi_cc' over the samples of c or c'
        i, j = torch.triu_indices(K, K, 1, device=code.device)  # (P,) each
        in_pair = w.unsqueeze(-1) * (onehot[:, i] + onehot[:, j]).unsqueeze(1)  # (B, M, P)
        n = in_pair.sum(0)  # (M, P)
        batch = (in_pair * pair_probabilities(probs)).sum(0) / n.clamp_min(1)  # (M, P)
        self.confusion.copy_(torch.where(n > 0, self.confusion.lerp(batch, mom), self.confusion))
