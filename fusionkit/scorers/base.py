"""Scorers: per-modality quality signals ``(B, M)`` that a scheduler turns into weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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

    Quantities several scorers read (the heads' probabilities, their confidence) are computed
    once, by :meth:`probs` and :meth:`shared`.
    """

    z: Tensor
    mask: Tensor
    logits: Tensor
    heads: UnimodalHeads
    hidden: Tensor | None = None
    _shared: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def shared(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, evaluated once per forward pass for every scorer that asks for ``key``."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def probs(self) -> Tensor:
        """The heads' probabilities ``softmax(logits)`` in float32: ``(B, M, K)``."""
        # softmax over the leading dim of a (K, B, M) copy: over a last dim of K ~ 10 the CPU
        # kernel is several times slower; the result is a (B, M, K) view of that copy
        return self.shared("probs", lambda: self.logits.float().permute(2, 0, 1).softmax(0).permute(1, 2, 0))


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
