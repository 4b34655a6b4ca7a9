"""Scorers: per-modality quality signals ``(B, M)`` that a scheduler turns into weights."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from fusionkit.fusions.base import UnimodalHeads


@dataclass
class ScoreContext:
    """Everything a scorer may read, computed once per forward pass.

    Attributes:
        z: stacked unimodal representations ``(B, M, d)``, missing rows zeroed.
        mask: presence ``(B, M)``.
        logits: unimodal head logits ``(B, M, K)``.
        heads: the heads themselves, for scorers that re-run them (MC-dropout).
        hidden: the heads' deterministic hidden layer ``(B, M, h)``, if already computed.
    """

    z: Tensor
    mask: Tensor
    logits: Tensor
    heads: UnimodalHeads
    hidden: Tensor | None = None


class ScorerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scorer(nn.Module):
    """A quality signal. ``signal`` is the key the scheduler reads it under."""

    Config = ScorerConfig
    signal: str = ""

    def __init__(self, config: BaseModel | None = None):
        super().__init__()
        self.config = config or self.Config()

    @classmethod
    def from_config(cls, config: BaseModel):
        return cls(config)

    def forward(self, ctx: ScoreContext) -> Tensor:
        """Return the signal ``(B, M)``; values at missing entries are ignored downstream."""
        raise NotImplementedError
