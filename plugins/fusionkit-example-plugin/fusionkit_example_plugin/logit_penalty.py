"""A training strategy: keep the fused logits small (a confidence penalty)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from fusionkit.registry import register
from fusionkit.strategies.base import Strategy, StrategyConfig


class LogitPenaltyConfig(StrategyConfig):
    weight: float = Field(0.01, ge=0, description="weight of the mean squared fused logit")


@register("strategies", "logit_penalty")
class LogitPenalty(Strategy):
    """Adds weight * mean(logits^2) to the loss, against over-confident fused logits (example plugin)."""

    Config = LogitPenaltyConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = 0  # over the whole run: restored by --resume through state_dict

    def loss_terms(self, out, batch: dict[str, Any], model) -> dict[str, Tensor]:
        if out.logits is None:  # a generative decoder has no fused logits
            return {}
        return {"logit_penalty": self.config.weight * out.logits.float().pow(2).mean()}

    def after_step(self, model, step: int) -> None:
        self.steps += 1

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        return {"steps": self.steps}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
