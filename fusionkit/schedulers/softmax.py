"""Rule-based scheduler: ``w = masked_softmax((alpha*c - beta*u + gamma*s + ...) / tau)``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from fusionkit.errors import ConfigError
from fusionkit.fusions.base import masked_softmax
from fusionkit.registry import register
from fusionkit.schedulers.base import Scheduler, SchedulerConfig


class SoftmaxSchedulerConfig(SchedulerConfig):
    alpha: float = Field(1.0, description="weight of confidence (0 = ablate it)")
    beta: float = Field(1.0, description="weight of MC-dropout uncertainty, subtracted (0 = ablate)")
    gamma: float = Field(1.0, description="weight of alignment (0 = ablate it)")
    delta: float = Field(1.0, description="weight of agreement with the other modalities' consensus (0 = ablate)")
    temperature: float = Field(0.25, gt=0, description=(
        "tau: raw signals live in [0, 1] (alignment in [-1, 1]), so tau < 1 is needed for the "
        "weights to move away from uniform; standardised signals (std 1) want tau near 1"))
    coefficients: dict[str, float] = Field(default_factory=dict, description=(
        "coefficients of extra signals from plugin scorers, by signal name"))


@register("schedulers", "softmax")
class SoftmaxScheduler(Scheduler):
    """Rule: softmax over modalities of (alpha*c - beta*u + gamma*s + delta*a + plugin terms) / tau."""

    Config = SoftmaxSchedulerConfig

    def __init__(self, config=None, *, signals):
        super().__init__(config, signals=signals)
        cfg = self.config
        coef = {"confidence": cfg.alpha, "uncertainty": -cfg.beta, "alignment": cfg.gamma, "agreement": cfg.delta}
        coef.update(cfg.coefficients)
        missing = [s for s in self.signals if s not in coef]
        if missing:
            raise ConfigError(
                f"scheduler softmax has no coefficient for signal(s) {missing}; add them under "
                f"scheduler.coefficients")
        self.coef = {s: coef[s] for s in self.signals}
        self.register_buffer("coef_vector", torch.tensor([self.coef[s] for s in self.signals]), persistent=False)

    def forward(self, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
        if not self.signals:  # no scorer: uniform over present modalities
            return masked_softmax(mask.float() * 0.0, mask)
        logit = self.features(scores, mask) @ self.coef_vector.float()  # (B, M, S) @ (S,) -> (B, M)
        return masked_softmax(logit / self.config.temperature, mask)
