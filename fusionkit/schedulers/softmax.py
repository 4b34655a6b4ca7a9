"""Rule-based scheduler: ``w = masked_softmax((alpha*c - beta*u + gamma*s) / tau)``."""

from __future__ import annotations

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
    temperature: float = Field(0.25, gt=0, description=(
        "tau: signals live in [0, 1] (alignment in [-1, 1]), so tau < 1 is needed for the "
        "weights to move away from uniform"))
    coefficients: dict[str, float] = Field(default_factory=dict, description=(
        "coefficients of extra signals from plugin scorers, by signal name"))


@register("schedulers", "softmax")
class SoftmaxScheduler(Scheduler):
    """Rule: softmax over modalities of (alpha*c - beta*u + gamma*s + plugin terms) / tau."""

    Config = SoftmaxSchedulerConfig

    def __init__(self, config=None, *, signals):
        super().__init__(config, signals=signals)
        cfg = self.config
        coef = {"confidence": cfg.alpha, "uncertainty": -cfg.beta, "alignment": cfg.gamma}
        coef.update(cfg.coefficients)
        missing = [s for s in self.signals if s not in coef]
        if missing:
            raise ConfigError(
                f"scheduler softmax has no coefficient for signal(s) {missing}; add them under "
                f"scheduler.coefficients")
        self.coef = {s: coef[s] for s in self.signals}

    def forward(self, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
        logit = sum(self.coef[s] * scores[s] for s in self.signals)  # (B, M)
        if not self.signals:  # no scorer: uniform over present modalities
            logit = mask.float() * 0.0
        return masked_softmax(logit / self.config.temperature, mask)
