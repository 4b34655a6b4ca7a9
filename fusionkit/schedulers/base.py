"""Schedulers: quality signals ``{name: (B, M)}`` -> weights ``(B, M)`` (rows sum to 1)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    standardize: bool = Field(False, description=(
        "standardise each signal with running statistics (kept like batch-norm buffers, frozen in "
        "eval, saved in checkpoints) before weighting it, so coefficients of signals on very "
        "different scales (confidence ~0.9, MC-dropout variance ~5e-4) mean comparable things"))
    momentum: float = Field(0.05, gt=0, le=1, description=(
        "running-statistics update rate; the first 1/momentum batches use a cumulative mean"))


class SignalNorm(nn.Module):
    """Per-signal standardisation ``(s - mean) / std`` over present entries, batch-norm style.

    In training mode a batch is standardised with its own statistics (over every present
    ``(sample, modality)`` entry, modalities pooled so differences between modalities survive)
    and the running statistics are updated; in eval mode the running statistics are used as they
    are. Buffers: ``running_mean (S,)``, ``running_var (S,)``, ``batches (,)``.
    """

    EPS = 1e-8  # variance floor: a std below 1e-4 is treated as 1e-4 (MC variance is ~1e-3 wide)

    def __init__(self, signals: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(signals))
        self.register_buffer("running_var", torch.ones(signals))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """``feats (B, M, S)``, ``mask (B, M)`` -> standardised ``(B, M, S)``."""
        if not self.training:
            return (feats - self.running_mean.to(feats.dtype)) / (self.running_var.to(feats.dtype) + self.EPS).sqrt()
        m = mask.unsqueeze(-1).to(feats.dtype)  # (B, M, 1)
        n = m.sum().clamp_min(1)
        mean = (feats * m).sum((0, 1)) / n  # (S,)
        centered = feats - mean  # (B, M, S)
        var = (centered.square() * m).sum((0, 1)) / n  # (S,)
        with torch.no_grad():
            # cumulative at first; a tensor, so the update never reads a value back to Python
            rate = (self.batches + 1).reciprocal().clamp_min_(self.momentum).to(self.running_mean.dtype)  # (,)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), rate)
            self.running_var.lerp_(var.to(self.running_var.dtype), rate)
            self.batches += 1
        return centered / (var + self.EPS).sqrt()

    def scale(self, signals: list[str]) -> dict[str, dict[str, float]]:
        """``{signal: {"mean": ..., "std": ...}}`` of the running statistics (for reports)."""
        return {s: {"mean": float(self.running_mean[i]), "std": float(self.running_var[i].sqrt())}
                for i, s in enumerate(signals)}


class Scheduler(nn.Module):
    """Turns scores into masked weights; subclasses implement :meth:`forward`."""

    Config = SchedulerConfig

    def __init__(self, config: BaseModel | None = None, *, signals: list[str]):
        super().__init__()
        self.config = config or self.Config()
        self.signals = list(signals)  # the order features are stacked in
        self.norm = SignalNorm(len(self.signals), self.config.momentum) \
            if self.config.standardize and self.signals else None

    @classmethod
    def from_config(cls, config: BaseModel, *, signals: list[str]):
        return cls(config, signals=signals)

    def features(self, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
        """The signals stacked in ``self.signals`` order, standardised if configured: ``(B, M, S)``."""
        feats = torch.stack([scores[s] for s in self.signals], dim=-1).float()  # (B, M, S)
        return self.norm(feats, mask) if self.norm is not None else feats

    def signal_scale(self) -> dict[str, dict[str, float]] | None:
        """Running mean and std of each signal when standardising, else None."""
        return self.norm.scale(self.signals) if self.norm is not None else None

    def forward(self, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
        raise NotImplementedError
