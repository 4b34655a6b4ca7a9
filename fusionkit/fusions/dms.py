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
from fusionkit.tasks.targets import probe_correct


def mwcl(fused: Tensor, z: Tensor, weights: Tensor) -> Tensor:
    """``mean_b sum_m w_m ||h - z_m||^2`` for the mix ``fused = sum_m w_m z_m`` (rows of w sum to 1).

    For that mix the sum equals ``sum_m w_m ||z_m||^2 - ||h||^2`` (a weighted variance), which
    needs no ``(B, M, d)`` difference tensor. Shapes: ``fused (B, d)``, ``z (B, M, d)``,
    ``weights (B, M)``. :class:`DMSFusion` gets the same number from :func:`mix`.
    """
    return ((weights * z.square().sum(-1)).sum(1) - fused.square().sum(-1)).clamp_min(0).mean()


def mix(z: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, spread)``: the fused vector ``h = sum_m w_m z_m`` ``(B, d)`` and, in float32, each
    sample's weighted spread ``sum_m w_m ||z_m||^2 - ||h||^2 = sum_m w_m ||h - z_m||^2`` ``(B,)``
    (rows of w sum to 1), so that ``mwcl = spread.clamp_min(0).mean()``. Shapes: ``z (B, M, d)``,
    ``weights (B, M)`` in z's dtype.

    The numbers of ``h`` (bit for bit) and :func:`mwcl` (to float32 rounding) with fewer passes
    over the ``(B, M, d)`` tensor: the mix is one batched matmul, the norms one reduction, and the
    gradient with respect to ``z``, ``w_m (g_h - 2 g_s h + 2 g_s z_m)``, takes two passes where
    autograd on the plain expressions takes five (the derivative of ``square`` alone takes three).
    """
    return _Mix.apply(z, weights)


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        acc = torch.promote_types(z.dtype, torch.float32)  # the spread in float32 at least
        fused = torch.bmm(w.unsqueeze(1), z).squeeze(1)  # (B, 1, M) @ (B, M, d) -> (B, d)
        sq = torch.linalg.vector_norm(z, dim=-1, dtype=acc).square()  # (B, M): ||z_m||^2, one pass
        ctx.save_for_backward(z, w, sq, fused)
        return fused, (w.to(acc) * sq).sum(1) - fused.to(acc).square().sum(-1)  # (B, d), (B,)

    @staticmethod
    def backward(ctx, g_fused: Tensor, g_spread: Tensor) -> tuple[Tensor | None, Tensor | None]:
        z, w, sq, fused = ctx.saved_tensors
        g_h = g_fused - (2 * g_spread).unsqueeze(1).to(fused.dtype) * fused  # (B, d): total gradient at h
        grad_z = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_z = w.unsqueeze(-1) * g_h.unsqueeze(1)  # (B, M, d)
            grad_z.addcmul_(z, (2 * g_spread.unsqueeze(1) * w).unsqueeze(-1).to(z.dtype))  # + 2 g_s w_m z_m
        if ctx.needs_input_grad[1]:
            grad_w = (z * g_h.unsqueeze(1)).sum(-1) + (g_spread.unsqueeze(1) * sq).to(w.dtype)  # (B, M)
        return grad_z, grad_w


class DMSConfig(FusionConfig):
    scorers: list[Any] = component_field(
        "scorers", ["confidence", "mc_dropout", "agreement"],
        "quality signals; the paper's cosine 'alignment' is constant across modalities at M = 2 and "
        "lowered robustness when added here (docs/benchmarks.md), so the default reads prediction "
        "'agreement' instead; configs/presets/dms-paper.yaml has the paper's set")
    scheduler: Any = component_field(
        "schedulers", {"name": "softmax", "standardize": True, "temperature": 1.0},
        "softmax rule on standardised signals (monotone: a less confident head never gains weight); "
        "the learned mlp scheduler is best only when trained with train.augment, since without "
        "corrupted examples it extrapolates arbitrarily (configs/presets/dms-robust.yaml)")
    mwcl_weight: float = Field(0.1, ge=0, description=(
        "lambda: pulls h towards each z_m in proportion to w_m, so the fused vector stays "
        "interpretable as a mix of unimodal ones"))
    detach_scores: bool = Field(True, description=(
        "stop gradients from the weights into the heads, so the task loss cannot make a head "
        "over-confident to win weight"))
    route_weight: float = Field(1.0, ge=0, description=(
        "supervise a learned scheduler with which heads were right: cross-entropy between the "
        "weights and the uniform distribution over the correct present heads, on samples where "
        "some but not all heads are right (scores stay detached, so only the scheduler learns); "
        "ignored by a scheduler without parameters (the softmax rule)"))


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
        # the routing loss only trains a scheduler with parameters (mlp); the softmax rule has none
        self.routes = cfg.route_weight > 0 and any(p.requires_grad for p in self.scheduler.parameters())

    def forward(self, z: dict[str, Tensor], mask: Tensor | None = None) -> FusionOutput:
        stacked, mask = stack_modalities(z, self.modalities, mask)  # (B, M, d), (B, M)
        hidden = self.heads.hidden(stacked)  # (B, M, h): computed once, reused by MC-dropout
        logits = self.heads.output(F.dropout(hidden, self.heads.dropout, self.training))  # (B, M, K)
        return self.combine(stacked, mask, logits, hidden)

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor, hidden: Tensor | None = None) -> FusionOutput:
        # with detach_scores nothing below reaches the graph: no gradient from the weights into the
        # heads or z (the same as reading detached copies, without building the graph first)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.detach_scores):
            scored = self.heads.calibrate(unimodal_logits)  # (B, M, K): temperature-scaled for scoring
            ctx = ScoreContext(z=z, mask=mask, logits=scored, heads=self.heads, hidden=hidden)
            scores = {s.signal: s(ctx) for s in self.scorers}  # each (B, M)
        weights = self.scheduler(scores, mask)  # (B, M), 0 where missing
        losses = {}
        if self.config.mwcl_weight > 0:
            fused, spread = mix(z, weights.to(z.dtype))  # (B, d), (B,)
            losses["mwcl"] = self.config.mwcl_weight * spread.clamp_min(0).mean()
        else:
            fused = (weights.to(z.dtype).unsqueeze(-1) * z).sum(1)  # (B, M, 1) * (B, M, d) -> (B, d)
        return FusionOutput(fused=fused, weights=weights, unimodal_logits=unimodal_logits, mask=mask,
                            z=z, modalities=self.modalities, scores=scores, extra_losses=losses)

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        terms = super().loss_terms(out, target)
        if self.routes:
            terms["route"] = self.config.route_weight * route_loss(out.weights, out.unimodal_logits, target, out.mask)
        return terms


def route_loss(weights: Tensor, unimodal_logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of the weights against "which present heads were right".

    Target per sample: uniform over the present heads whose argmax is the true class (soft
    targets ``(B, K)``: one of the sample's classes). Samples where no head or every present head
    is right carry no routing information and are left out (0 when the batch has none). Shapes:
    ``weights (B, M)``, ``unimodal_logits (B, M, K)``, ``target (B,)`` or ``(B, K)``.
    """
    right = probe_correct(unimodal_logits.detach().argmax(-1), target) & mask  # (B, M)
    n_right = right.sum(1)  # (B,)
    informative = ((n_right > 0) & (n_right < mask.sum(1))).float()  # (B,)
    goal = right.float() / n_right.clamp_min(1).unsqueeze(1)  # (B, M)
    ce = -(goal * weights.float().clamp_min(1e-8).log()).sum(1)  # (B,)
    return (ce * informative).sum() / informative.sum().clamp_min(1)
