"""Multi-QuAD / QADM-Net (Shen, Chen, Zhang; arXiv 2412.14489 v2-v3): quality-adaptive depth and parameters.

For each present modality m of a sample (K classes, L refinement layers):

- NFCE, quality from noise-free prototypes, classifier-free: ``P_mk`` is a running mean of the
  unit features ``zhat_m`` of the training samples of class k that the prototypes already
  classify correctly (``P <- P + alpha (mean - P)``); ``q_m = softmax_k(s cos(z_m, P_mk))``,
  modality-level confidence ``c_m = (max_k q_mk - 1/K) / (1 - 1/K)`` and feature-level quality
  ``a_m = d * zhat_m * sum_k q_mk Phat_mk``. Two terms shape the features the prototypes
  average: ``proto`` (cross-entropy of ``s cos(z, P)``, through z: a prototype bound on the
  mutual information between features and labels) and ``ortho`` (squared cosines between the
  batch's class means). ``prototypes: learned`` keeps v1's trained prototypes instead;
- GCND, depth from globally normalised confidence: ``chat_m = sigmoid((c_m - mu) / sigma)`` with
  mu, sigma the confidence moments over every present (sample, modality) of the batch (running
  moments in evaluation); target depth ``n*_m = 1 + (L - 1) chat_m`` (``gcnd: false``: v1's
  ``1 + (L - 1)(1 - c_m)``). The exit is ``n_m = argmax_n pi_n``,
  ``pi_n = softmax_n(-(n - n*_m)^2 / tau)``, with a straight-through (or soft) gate in training;
- LGP, layer-wise greedy parameters: layer l of modality m, ``r^(l) = r^(l-1) +
  gamma_ml * gelu(r^(l-1) W_ml + b_ml)``, ``r^(0) = z_m``, gets per-sample parameters
  ``gamma_ml = 2 sigmoid([a^(l-1)_m; abar^(l-1)] G_l + g_l)`` predicted from the feature-level
  quality of its own input and the mean quality abar over the present modalities (cross-modal),
  so each layer's parameters exist whatever depth the sample exits at (``lgp: false``: v1's one
  hypernetwork on a_m giving output gates ``2 sigmoid(u_m)`` and the fusion logit);
- ``w = masked_softmax(e_m + log(eps + c_m))`` with ``e_m = v . [a_m; abar] + b_v`` (zero at
  init: the weights start proportional to the confidence), ``h = sum_m w_m r_m^(n_m)``.

Quality signals read ``z`` detached (they estimate quality; the ``proto`` and ``ortho`` terms are
what trains the encoders towards it). docs/fusions.md lists every choice made where the paper
is silent.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.errors import ConfigError
from fusionkit.fusions.base import Fusion, FusionConfig, FusionOutput, masked_softmax, masked_unimodal_loss
from fusionkit.registry import register
from fusionkit.tasks.targets import has_label, is_soft

EPS = 1e-6  # keeps log(c) and 1/sigma finite when a confidence or its spread is exactly 0


def prototype_logits(z: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    """``s * cos(z_m, P_mk)``: ``z (B, M, d)``, ``prototypes (M, K, d)`` -> ``(B, M, K)``.

    A zero row (missing modality) has cosine 0 to every prototype, hence uniform probabilities.
    """
    zn = F.normalize(z, dim=-1, eps=1e-8)  # (B, M, d)
    pn = F.normalize(prototypes, dim=-1, eps=1e-8)  # (M, K, d)
    return scale * torch.einsum("bmd,mkd->bmk", zn, pn)


def prototype_confidence(probs: Tensor) -> Tensor:
    """``(max_k q_k - 1/K) / (1 - 1/K)``: ``(..., K) -> (...)`` in [0, 1] (0 uniform, 1 one-hot).

    Evaluated as ``(K max q - 1) / (K - 1)``, which is exactly 1 for a one-hot row."""
    K = probs.shape[-1]
    return (K * probs.max(-1).values - 1.0) / (K - 1.0)


def informativeness(z: Tensor, probs: Tensor, prototypes: Tensor) -> Tensor:
    """Feature-level quality ``a = d * zhat * sum_k q_k Phat_k``: ``(B, M, d)``.

    Feature j is informative when it points the sample towards the prototypes it is likely to
    belong to; ``mean_j a_j = sum_k q_k cos(z, P_k)``. Shapes: ``z (B, M, d)``,
    ``probs (B, M, K)``, ``prototypes (M, K, d)``.
    """
    d = z.shape[-1]
    zn = F.normalize(z, dim=-1, eps=1e-8)  # (B, M, d)
    pn = F.normalize(prototypes, dim=-1, eps=1e-8)  # (M, K, d)
    expected = torch.einsum("bmk,mkd->bmd", probs.to(pn.dtype), pn)  # (B, M, d)
    return d * zn * expected


def class_sums(z: Tensor, target: Tensor, keep: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per modality and class, the sum of the unit features ``zhat`` of the kept samples and their count.

    ``z (B, M, d)``, ``target (B,)`` class indices, ``keep (B, M)`` -> ``(M, K, d)``, ``(M, K)``.
    """
    onehot = F.one_hot(target.clamp(min=0), num_classes).to(z.dtype)  # (B, K)
    w = onehot.unsqueeze(1) * keep.unsqueeze(-1).to(z.dtype)  # (B, M, K)
    sums = torch.einsum("bmk,bmd->mkd", w, F.normalize(z, dim=-1, eps=1e-8))  # (M, K, d)
    return sums, w.sum(0)


def noise_free_update(prototypes: Tensor, seen: Tensor, z: Tensor, target: Tensor, present: Tensor,
                      momentum: float) -> tuple[Tensor, Tensor]:
    """One step of the noise-free prototypes: ``P_mk <- P_mk + alpha (mean_i zhat_im - P_mk)``.

    The mean runs over the present, labelled samples of class k whose nearest prototype is
    already P_mk (a misclassified sample is treated as noise); a class never seen before takes
    all its samples and ``alpha = 1``. Shapes: ``prototypes (M, K, d)``, ``seen (M, K)`` bool,
    ``z (B, M, d)``, ``target (B,)``, ``present (B, M)``; returns the new prototypes and seen.
    """
    K = prototypes.shape[1]
    y = target.clamp(min=0)  # (B,)
    pred = prototype_logits(z, prototypes, 1.0).argmax(-1)  # (B, M)
    trusted = (pred == y.unsqueeze(1)) | ~seen.t()[y]  # (B, M): right, or its class has no prototype yet
    keep = present & has_label(target).unsqueeze(1) & trusted  # (B, M)
    sums, counts = class_sums(z, target, keep, K)  # (M, K, d), (M, K)
    mean = sums / counts.clamp(min=1).unsqueeze(-1)  # (M, K, d)
    rate = torch.where(seen, momentum, 1.0) * (counts > 0)  # (M, K): classes absent from the batch stay
    return prototypes + rate.unsqueeze(-1) * (mean - prototypes), seen | (counts > 0)


def class_orthogonality(z: Tensor, target: Tensor, present: Tensor, num_classes: int) -> Tensor:
    """Mean squared cosine between the batch means of different classes, over modalities: a scalar.

    ``z (B, M, d)``, ``target (B,)``, ``present (B, M)``; 0 when no modality has two classes.
    """
    sums, counts = class_sums(z, target, present & has_label(target).unsqueeze(1), num_classes)
    means = F.normalize(sums, dim=-1, eps=1e-8)  # (M, K, d)
    cos = torch.einsum("mkd,mjd->mkj", means, means)  # (M, K, K)
    has = counts > 0  # (M, K)
    eye = torch.eye(num_classes, dtype=torch.bool, device=z.device)
    pairs = has.unsqueeze(2) & has.unsqueeze(1) & ~eye  # (M, K, K)
    return (cos.square() * pairs).sum() / pairs.sum().clamp(min=1)


def masked_moments(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance of ``values (B, M)`` over the present entries: two scalars."""
    m = mask.to(values.dtype)
    n = m.sum().clamp(min=1)
    mean = (values * m).sum() / n
    return mean, ((values - mean).square() * m).sum() / n


def exit_distribution(fraction: Tensor, depth: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Soft ``pi`` and hard one-hot exits over ``n = 1..L`` from ``fraction (B, M)`` in [0, 1]: ``(B, M, L)`` each.

    ``n* = 1 + (L - 1) fraction``, ``pi_n = softmax_n(-(n - n*)^2 / tau)``; the hard exit is
    ``argmax pi`` (the exit nearest to n*, the shallower one on a tie).
    """
    n = torch.arange(1, depth + 1, dtype=fraction.dtype, device=fraction.device)  # (L,)
    target = 1.0 + (depth - 1) * fraction  # (B, M)
    pi = torch.softmax(-(n - target.unsqueeze(-1)).square() / temperature, dim=-1)  # (B, M, L)
    hard = F.one_hot(pi.argmax(-1), depth).to(pi.dtype)  # (B, M, L)
    return pi, hard


class QADMConfig(FusionConfig):
    prototypes: Literal["noise_free", "learned"] = Field("noise_free", description=(
        "NFCE: noise_free prototypes are running means of the correctly classified training "
        "features of each class (their distance measures quality); learned ones (v1) are "
        "parameters trained by the prototype cross-entropy, which fit the decision boundary "
        "rather than the clean class centres"))
    gcnd: bool = Field(True, description=(
        "GCND: exit depth from the confidence normalised over all present modalities and "
        "samples (higher confidence, deeper); false: v1's n* = 1 + (L - 1)(1 - c)"))
    lgp: bool = Field(True, description=(
        "LGP: every refinement layer gets per-sample parameters from the feature-level quality "
        "of its own input across modalities; false: v1's single hypernetwork on the input"))
    depth: int = Field(3, ge=1, description=(
        "L: residual refinement layers per modality; a sample leaves after n in 1..L of them"))
    proto_scale: float = Field(10.0, gt=0, description=(
        "s in softmax(s * cos(z, P)): cosines lie in [-1, 1], so s sets how peaked (how "
        "confident) the prototype probabilities can get"))
    proto_weight: float = Field(1.0, ge=0, description=(
        "weight of the prototype cross-entropy: with noise-free prototypes it pulls the "
        "encoders' features to their class prototype (the mutual-information term), with "
        "learned ones it trains the prototypes"))
    ortho_weight: float = Field(1.0, ge=0, description=(
        "weight of the orthogonality term (noise-free prototypes only): squared cosines between "
        "class means, so the prototypes stay apart and a feature between classes looks doubtful"))
    momentum: float = Field(0.1, gt=0, le=1, description=(
        "alpha: step of the running means (noise-free prototypes, GCND's confidence moments); "
        "about 1/alpha batches of memory"))
    depth_gate: Literal["straight_through", "soft"] = Field("straight_through", description=(
        "how the exit is made differentiable in training: straight_through keeps the hard exit "
        "in the forward pass (training = evaluation) and passes gradients through the soft pi; "
        "soft mixes all exits by pi in training (hard in evaluation)"))
    depth_temperature: float = Field(0.5, gt=0, description=(
        "tau in pi_n ~ exp(-(n - n*)^2 / tau): smaller concentrates pi on the nearest exit"))


@register("fusions", "qadm")
class QADMFusion(Fusion):
    """Multi-QuAD: noise-free prototype quality sets each modality's depth, layer parameters and weight.

    Example::

        fusion = QADMFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.scores["depth"]: (B, 2) exits
        loss = F.cross_entropy(head(out.fused), y) + fusion.loss(out, y)   # "proto", "ortho"
    """

    Config = QADMConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        cfg = self.config
        M, L = len(self.modalities), cfg.depth
        # unit-scale init: only the direction of a prototype matters, and Adam moves a short
        # vector's direction faster; noise-free prototypes replace this with the first class mean
        init = torch.randn(M, num_classes, dim) / math.sqrt(dim)  # (M, K, d)
        if cfg.prototypes == "learned":
            self.prototypes = nn.Parameter(init)
        else:
            self.register_buffer("prototypes", init)
            self.register_buffer("proto_seen", torch.zeros(M, num_classes, dtype=torch.bool))  # (M, K)
        if cfg.gcnd:  # global confidence moments for evaluation, like batch norm's
            self.register_buffer("conf_mean", torch.tensor(0.5))
            self.register_buffer("conf_var", torch.tensor(0.1))
        # L refinement layers per modality, stacked so all modalities run in one einsum per layer
        self.layer_w = nn.Parameter(torch.empty(M, L, dim, dim))  # (M, L, d, d)
        self.layer_b = nn.Parameter(torch.zeros(M, L, dim))  # (M, L, d)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default scale
        nn.init.uniform_(self.layer_w, -bound, bound)
        # zero-init hypernetworks: every gate starts at 1 and the weights at c / sum c
        if cfg.lgp:
            self.lgp_w = nn.Parameter(torch.zeros(L, 2 * dim, dim))  # (L, 2d, d): [a; abar] -> gamma logits
            self.lgp_b = nn.Parameter(torch.zeros(L, dim))  # (L, d)
            self.weigher = nn.Linear(2 * dim, 1)
            nn.init.zeros_(self.weigher.weight)
            nn.init.zeros_(self.weigher.bias)
        else:
            self.hyper = nn.Linear(dim, dim + 1)  # a -> [output gate logits (d); fusion logit (1)]
            nn.init.zeros_(self.hyper.weight)
            nn.init.zeros_(self.hyper.bias)

    def quality(self, r: Tensor, mask: Tensor, prototypes: Tensor) -> Tensor:
        """``[a_m; abar]``: feature-level quality of ``r (B, M, d)`` and its mean over present modalities, ``(B, M, 2d)``."""
        rq = r.detach().float()
        probs = prototype_logits(rq, prototypes, self.config.proto_scale).softmax(-1)  # (B, M, K)
        a = informativeness(rq, probs, prototypes)  # (B, M, d)
        m = mask.unsqueeze(-1).to(a.dtype)  # (B, M, 1)
        abar = (a * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)  # (B, 1, d)
        return torch.cat([a, abar.expand_as(a)], dim=-1)

    def refine(self, z: Tensor, mask: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor | None]:
        """Every exit of every modality's network, ``(B, M, L, d)``, and (LGP) the input quality ``(B, M, 2d)``."""
        r, exits, first = z, [], None
        for layer in range(self.config.depth):
            pre = torch.einsum("bmd,mde->bme", r, self.layer_w[:, layer]) + self.layer_b[:, layer]  # (B, M, d)
            step = F.gelu(pre)  # (B, M, d)
            if self.config.lgp:  # greedy: this layer's parameters from the quality of its own input
                q = self.quality(r, mask, prototypes)  # (B, M, 2d)
                first = q if first is None else first
                gamma = 2.0 * torch.sigmoid(q.to(self.lgp_w.dtype) @ self.lgp_w[layer] + self.lgp_b[layer])  # (B, M, d)
                step = gamma.to(step.dtype) * step
            r = r + step
            exits.append(r)
        return torch.stack(exits, dim=2), first  # (B, M, L, d)

    def depth_fraction(self, confidence: Tensor, mask: Tensor) -> Tensor:
        """Where in [0, 1] each target exit lies: ``(B, M)``; GCND normalises over the whole batch."""
        if not self.config.gcnd:
            return 1.0 - confidence
        if self.training:
            mean, var = masked_moments(confidence, mask)
            with torch.no_grad():
                self.conf_mean.lerp_(mean.detach(), self.config.momentum)
                self.conf_var.lerp_(var.detach(), self.config.momentum)
        else:
            mean, var = self.conf_mean, self.conf_var
        return torch.sigmoid((confidence - mean) / torch.sqrt(var + EPS))

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        cfg = self.config
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        prototypes = self.prototypes.float()
        probs = prototype_logits(z.detach().float(), prototypes, cfg.proto_scale).softmax(-1)  # (B, M, K)
        confidence = prototype_confidence(probs)  # (B, M)
        fraction = self.depth_fraction(confidence, mask)  # (B, M)
        pi, hard = exit_distribution(fraction, cfg.depth, cfg.depth_temperature)  # (B, M, L) each
        if not self.training:
            gate = hard
        elif cfg.depth_gate == "soft":
            gate = pi
        else:  # straight-through: exactly the hard exit forward, d/d pi backward
            gate = hard + (pi - pi.detach())
        exits, first = self.refine(z, mask, prototypes)  # (B, M, L, d)
        refined = torch.einsum("bml,bmld->bmd", gate.to(z.dtype), exits)  # (B, M, d)
        if cfg.lgp:
            logit = self.weigher(first.to(self.weigher.weight.dtype)).squeeze(-1)  # (B, M)
        else:
            info = informativeness(z.detach().float(), probs, prototypes)  # (B, M, d)
            params = self.hyper(info.to(self.hyper.weight.dtype))  # (B, M, d + 1)
            refined = 2.0 * torch.sigmoid(params[..., :-1]).to(z.dtype) * refined
            logit = params[..., -1]
        # modality-level quality as a prior on the weights: a doubtful modality starts light
        weights = masked_softmax(logit.float() + torch.log(confidence + EPS), mask)  # (B, M), 0 where missing
        parts = torch.where(mask.unsqueeze(-1), refined, zero)  # (B, M, d)
        fused = (weights.unsqueeze(-1).to(z.dtype) * parts).sum(1)  # (B, d)
        depth = (hard * torch.arange(1, cfg.depth + 1, dtype=hard.dtype, device=hard.device)).sum(-1)  # (B, M)
        fzero = torch.zeros((), dtype=confidence.dtype, device=z.device)
        scores = {"confidence": torch.where(mask, confidence, fzero).detach(),
                  "depth": torch.where(mask, depth, fzero)}
        if cfg.gcnd:
            scores["normalized_confidence"] = torch.where(mask, fraction, fzero).detach()
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits, mask=mask,
                            z=z, modalities=self.modalities, scores=scores)

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        """Base terms plus ``proto`` (prototype cross-entropy) and, for noise-free prototypes, ``ortho``.

        In training, noise-free prototypes also take their running-mean step here, where the
        labels are.
        """
        if is_soft(target):
            raise ConfigError("fusion qadm needs single-label targets (one class per sample); this task's "
                              "probe targets are soft (captioning, retrieval): choose another fusion, e.g. dms")
        cfg = self.config
        terms = super().loss_terms(out, target)
        noise_free = cfg.prototypes == "noise_free"
        if cfg.proto_weight > 0:
            # noise-free: the loss moves the features (encoders) to the fixed prototypes; learned: the reverse
            z = out.z.float() if noise_free else out.z.detach().float()
            prototypes = self.prototypes.detach().float() if noise_free else self.prototypes.float()
            logits = prototype_logits(z, prototypes, cfg.proto_scale)  # (B, M, K)
            terms["proto"] = cfg.proto_weight * masked_unimodal_loss(logits, target, out.mask)
        if noise_free and cfg.ortho_weight > 0:
            terms["ortho"] = cfg.ortho_weight * class_orthogonality(out.z.float(), target, out.mask, self.num_classes)
        if noise_free and self.training:
            with torch.no_grad():
                new, seen = noise_free_update(self.prototypes, self.proto_seen, out.z.detach().to(self.prototypes.dtype),
                                              target, out.mask, cfg.momentum)
                self.prototypes.copy_(new)
                self.proto_seen.copy_(seen)
        return terms
