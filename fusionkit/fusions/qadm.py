"""QADM-Net (Shen, Zhang, Chen; arXiv 2412.14489): quality-adaptive depth and per-sample parameters.

For each present modality m of a sample (K classes, L refinement layers):

- quality from learned class prototypes ``P_m (K, d)``, classifier-free:
  ``q_m = softmax(s * cos(z_m, P_mk))`` over k and confidence
  ``c_m = (max_k q_mk - 1/K) / (1 - 1/K)`` in [0, 1] (0: uniform, 1: one-hot);
- confidence-guided depth: ``n*_m = 1 + (L - 1)(1 - c_m)``; the sample leaves modality m's
  residual refinement network ``r^(l) = r^(l-1) + gelu(r^(l-1) W_ml + b_ml)``, ``r^(0) = z_m``,
  at exit ``n_m = argmax_n pi_n`` with ``pi_n = softmax_n(-(n - n*_m)^2 / tau)``, ``n = 1..L``
  (the nearest exit; a tie goes to the shallower one). Low confidence: deeper. Forward always
  uses the hard exit; in training the straight-through estimator ``hard + pi - stopgrad(pi)``
  carries the task gradient into the prototypes (``depth_gate: soft`` mixes ``sum_n pi_n r^(n)``
  in training instead, hard in eval);
- informativeness-based dynamic parameters: feature-level informativeness
  ``a_m = d * zhat_m * sum_k q_mk Phat_mk`` (elementwise; its mean over features is the expected
  cosine to the prototypes) feeds a hypernetwork shared by all modalities,
  ``[u_m; e_m] = A a_m + b``, giving per-sample feature gates ``g_m = 2 sigmoid(u_m)`` (a
  per-sample diagonal output layer) and a fusion logit ``e_m``;
- ``w = masked_softmax(e)``, ``h = sum_m w_m g_m * r_m``.

Quality signals read ``z`` detached (they estimate quality, they do not train the encoders);
the prototypes learn from a cross-entropy on ``s * cos`` (``proto_weight``) and, through the
depth gate and the hypernetwork, from the task loss. docs/fusions.md lists every choice made
where the paper is silent.
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
from fusionkit.tasks.targets import is_soft


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
    """Feature-level informativeness ``a = d * zhat * sum_k q_k Phat_k``: ``(B, M, d)``.

    Feature j is informative when it points the sample towards the prototypes it is likely to
    belong to; ``mean_j a_j = sum_k q_k cos(z, P_k)``. Shapes: ``z (B, M, d)``,
    ``probs (B, M, K)``, ``prototypes (M, K, d)``.
    """
    d = z.shape[-1]
    zn = F.normalize(z, dim=-1, eps=1e-8)  # (B, M, d)
    pn = F.normalize(prototypes, dim=-1, eps=1e-8)  # (M, K, d)
    expected = torch.einsum("bmk,mkd->bmd", probs.to(pn.dtype), pn)  # (B, M, d)
    return d * zn * expected


def exit_distribution(confidence: Tensor, depth: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Soft ``pi`` and hard one-hot exits over ``n = 1..L`` from ``confidence (B, M)``: ``(B, M, L)`` each.

    ``n* = 1 + (L - 1)(1 - c)``, ``pi_n = softmax_n(-(n - n*)^2 / tau)``; the hard exit is
    ``argmax pi`` (the exit nearest to n*, the shallower one on a tie).
    """
    n = torch.arange(1, depth + 1, dtype=confidence.dtype, device=confidence.device)  # (L,)
    target = 1.0 + (depth - 1) * (1.0 - confidence)  # (B, M)
    pi = torch.softmax(-(n - target.unsqueeze(-1)).square() / temperature, dim=-1)  # (B, M, L)
    hard = F.one_hot(pi.argmax(-1), depth).to(pi.dtype)  # (B, M, L)
    return pi, hard


class QADMConfig(FusionConfig):
    depth: int = Field(3, ge=1, description=(
        "L: residual refinement layers per modality; a sample leaves after n in 1..L of them, "
        "more the less confident it is"))
    proto_scale: float = Field(10.0, gt=0, description=(
        "s in softmax(s * cos(z, P)): cosines lie in [-1, 1], so s sets how peaked (how "
        "confident) the prototype probabilities can get"))
    proto_weight: float = Field(1.0, ge=0, description=(
        "weight of the prototype cross-entropy; without it the prototypes, hence the confidence "
        "that sets the depth, learn only indirectly from the task loss"))
    depth_gate: Literal["straight_through", "soft"] = Field("straight_through", description=(
        "how the exit is made differentiable in training: straight_through keeps the hard exit "
        "in the forward pass (training = evaluation) and passes gradients through the soft pi; "
        "soft mixes all exits by pi in training (hard in evaluation)"))
    depth_temperature: float = Field(0.5, gt=0, description=(
        "tau in pi_n ~ exp(-(n - n*)^2 / tau): smaller concentrates pi on the nearest exit"))


@register("fusions", "qadm")
class QADMFusion(Fusion):
    """QADM-Net: prototype confidence sets each modality's depth; informativeness sets per-sample weights.

    Example::

        fusion = QADMFusion(["image", "text"], dim=128, num_classes=10)
        out = fusion({"image": zi, "text": zt}, mask)   # out.scores["depth"]: (B, 2) exits
        loss = F.cross_entropy(head(out.fused), y) + fusion.loss(out, y)   # includes "proto"
    """

    Config = QADMConfig

    def __init__(self, modalities, dim, num_classes, config=None, **overrides):
        super().__init__(modalities, dim, num_classes, config, **overrides)
        M, L = len(self.modalities), self.config.depth
        # unit-scale init: only the direction of a prototype matters, and Adam moves a short
        # vector's direction faster (with norm sqrt(d) the prototypes barely turned in 30 epochs)
        self.prototypes = nn.Parameter(torch.randn(M, num_classes, dim) / math.sqrt(dim))  # (M, K, d)
        # L refinement layers per modality, stacked so all modalities run in one einsum per layer
        self.layer_w = nn.Parameter(torch.empty(M, L, dim, dim))  # (M, L, d, d)
        self.layer_b = nn.Parameter(torch.zeros(M, L, dim))  # (M, L, d)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default scale
        nn.init.uniform_(self.layer_w, -bound, bound)
        # hypernetwork a -> [gate logits (d); fusion logit (1)], shared by every modality; zero
        # init: every gate starts at 1 and the weights uniform, so training starts from the mean
        self.hyper = nn.Linear(dim, dim + 1)
        nn.init.zeros_(self.hyper.weight)
        nn.init.zeros_(self.hyper.bias)

    def refine(self, z: Tensor) -> Tensor:
        """Every exit of every modality's refinement network: ``z (B, M, d) -> (B, M, L, d)``."""
        r, exits = z, []
        for layer in range(self.config.depth):
            pre = torch.einsum("bmd,mde->bme", r, self.layer_w[:, layer]) + self.layer_b[:, layer]  # (B, M, d)
            r = r + F.gelu(pre)  # (B, M, d)
            exits.append(r)
        return torch.stack(exits, dim=2)  # (B, M, L, d)

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        cfg = self.config
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        # quality: prototype probabilities, confidence and informativeness, from detached z
        probs = prototype_logits(z.detach().float(), self.prototypes.float(), cfg.proto_scale).softmax(-1)  # (B, M, K)
        confidence = prototype_confidence(probs)  # (B, M)
        pi, hard = exit_distribution(confidence, cfg.depth, cfg.depth_temperature)  # (B, M, L) each
        if not self.training:
            gate = hard
        elif cfg.depth_gate == "soft":
            gate = pi
        else:  # straight-through: exactly the hard exit forward, d/d pi backward
            gate = hard + (pi - pi.detach())
        refined = torch.einsum("bml,bmld->bmd", gate.to(z.dtype), self.refine(z))  # (B, M, d)
        # dynamic parameters from feature-level informativeness
        info = informativeness(z.detach().float(), probs, self.prototypes.float())  # (B, M, d)
        params = self.hyper(info.to(self.hyper.weight.dtype))  # (B, M, d + 1)
        gates = 2.0 * torch.sigmoid(params[..., :-1])  # (B, M, d)
        weights = masked_softmax(params[..., -1].float(), mask)  # (B, M), 0 where missing
        parts = torch.where(mask.unsqueeze(-1), gates.to(z.dtype) * refined, zero)  # (B, M, d)
        fused = (weights.unsqueeze(-1).to(z.dtype) * parts).sum(1)  # (B, d)
        depth = (hard * torch.arange(1, cfg.depth + 1, dtype=hard.dtype, device=hard.device)).sum(-1)  # (B, M)
        fzero = torch.zeros((), dtype=confidence.dtype, device=z.device)
        scores = {"confidence": torch.where(mask, confidence, fzero).detach(),
                  "depth": torch.where(mask, depth, fzero)}
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits, mask=mask,
                            z=z, modalities=self.modalities, scores=scores)

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        """Base terms plus ``proto``: cross-entropy of the prototype classifier on each present modality."""
        if is_soft(target):
            raise ConfigError("fusion qadm needs single-label targets (one class per sample); this task's "
                              "probe targets are soft (captioning, retrieval): choose another fusion, e.g. dms")
        terms = super().loss_terms(out, target)
        if self.config.proto_weight > 0:
            logits = prototype_logits(out.z.detach().float(), self.prototypes.float(), self.config.proto_scale)
            terms["proto"] = self.config.proto_weight * masked_unimodal_loss(logits, target, out.mask)
        return terms
