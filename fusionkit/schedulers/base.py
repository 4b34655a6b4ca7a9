"""Schedulers: quality signals ``{name: (B, M)}`` -> weights ``(B, M)`` (rows sum to 1)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scheduler(nn.Module):
    """Turns scores into masked weights; subclasses implement :meth:`forward`."""

    Config = SchedulerConfig

    def __init__(self, config: BaseModel | None = None, *, signals: list[str]):
        super().__init__()
        self.config = config or self.Config()
        self.signals = list(signals)  # the order features are stacked in

    @classmethod
    def from_config(cls, config: BaseModel, *, signals: list[str]):
        return cls(config, signals=signals)

    def forward(self, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
        raise NotImplementedError
