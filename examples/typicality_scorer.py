"""A DMS scorer plugin: how typical each modality's representation is of its training data.

Confidence, MC-dropout uncertainty and agreement all read the unimodal heads, so a head that is
confidently wrong on an input unlike anything it was trained on (white noise on the audio of
``fusionkit data demo``) fools all three, and DMS gives that modality *more* weight. This scorer
reads the representation instead: it keeps a running per-dimension mean and variance of each
modality's ``z_m`` over the present rows seen in training, and scores

    t_m = -log(1 + mean_d ((z_m,d - mu_m,d)^2 / (var_m,d + 1e-5)))

so an out-of-distribution input scores low and the scheduler takes weight away from it.

Use it as a plugin (it is not a built-in yet: see docs/benchmarks.md, "The demo setting"):

    fusionkit --plugins examples/typicality_scorer.py train --data demo-digits/manifest.jsonl \\
        "model.fusion.scorers=[confidence,mc_dropout,agreement,typicality]" \\
        "model.fusion.scheduler.coefficients={typicality: 1.0}"
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionkit.registry import register
from fusionkit.scorers.base import ScoreContext, Scorer, ScorerConfig


@register("scorers", "typicality")
class TypicalityScorer(Scorer):
    """``-log(1 + mean_d ((z - mu)^2 / var))`` per modality, from running training statistics."""

    signal = "typicality"
    Config = ScorerConfig
    momentum = 0.05  # weight of each training batch in the running statistics

    def __init__(self, config: ScorerConfig | None = None):
        super().__init__(config)
        # (M, d) each, sized at the first forward (the scorer is built before M and d are known)
        self.register_buffer("mu", torch.zeros(0))
        self.register_buffer("var", torch.zeros(0))

    def forward(self, ctx: ScoreContext) -> Tensor:
        z = ctx.z.detach().float()  # (B, M, d), missing rows zeroed
        present = ctx.mask.unsqueeze(-1).to(z.dtype)  # (B, M, 1)
        if self.mu.numel() == 0:
            self.mu = torch.zeros(z.shape[1:], device=z.device)  # (M, d)
            self.var = torch.ones(z.shape[1:], device=z.device)  # (M, d)
        if self.training:
            n = present.sum(0).clamp_min(1.0)  # (M, 1)
            mean = (z * present).sum(0) / n  # (M, d)
            var = ((z - mean).square() * present).sum(0) / n  # (M, d)
            seen = (present.sum(0) > 0).to(z.dtype)  # (M, 1): a modality absent from the batch keeps its stats
            self.mu.lerp_(mean, self.momentum * seen)
            self.var.lerp_(var, self.momentum * seen)
        distance = ((z - self.mu).square() / (self.var + 1e-5)).mean(-1)  # (B, M)
        return -torch.log1p(distance)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("mu", "var"):  # take the saved (M, d) shape before loading into it
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
