"""Corruption-aware training (``train.augment``): registered corruptions applied to training samples.

Each entry corrupts one modality of a sample with probability ``p`` at a severity drawn
uniformly from ``severity`` (a number, or a ``[low, high]`` range)::

    train:
      augment:
        - {corrupt: "image:gaussian_noise", p: 0.3, severity: [0, 1]}
        - {corrupt: "missing:any", p: 0.15}     # drop one present modality, chosen uniformly

``missing:MODALITY`` drops that modality; ``missing:any`` drops one of the sample's present
modalities. A drop never removes a sample's last present modality. The heads then see degraded
inputs with their true labels, so their confidence learns to fall on them, and a learned
scheduler learns to route around them.

Every draw comes from a generator seeded with ``(seed, epoch, sample index, entry)``: the same
seed gives the same corrupted epochs in any worker or process, and each epoch differs. With
``p = 0`` (or no entry) the training data are untouched.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset

from fusionkit.corruptions.base import Corruption, check_severity, parse_corruption_spec
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError, unknown_choice
from fusionkit.registry import registry

ANY = "any"  # missing:any


class AugmentConfig(BaseModel):
    """One ``train.augment`` entry."""

    model_config = ConfigDict(extra="forbid")

    corrupt: str = Field(description="MODALITY:CORRUPTION (image:gaussian_noise), missing:MODALITY or missing:any")
    p: float = Field(ge=0, le=1, description="probability that a training sample gets this corruption")
    severity: float | tuple[float, float] = Field((0.0, 1.0), description=(
        "severity, or a [low, high] range drawn uniformly per sample; ignored by missing"))

    @field_validator("severity")
    @classmethod
    def _severity(cls, v):
        lo, hi = (v, v) if isinstance(v, (int, float)) else v
        for x in (lo, hi):
            check_severity(x, "train.augment")
        if lo > hi:
            raise ValueError(f"severity range [{lo}, {hi}] must have low <= high")
        return v


@dataclass(frozen=True)
class Augmentation:
    """An :class:`AugmentConfig` resolved against the run's modalities."""

    text: str
    modality: str  # a modality name, or "any" for missing:any
    kind: str | None
    corruption: Corruption
    p: float
    low: float
    high: float
    key: int  # crc32 of the entry, part of every seed

    @property
    def changes_values(self) -> bool:
        """True when the corruption rewrites the raw value (so a cached feature cannot be used)."""
        return not self.corruption.drops_modality


def resolve_augment(entries: Sequence[AugmentConfig], modalities: dict[str, ModalitySpec]) -> list[Augmentation]:
    """Check each entry against the run's modalities; one-line ConfigError naming the entry."""
    out = []
    for i, entry in enumerate(entries):
        where = f"train.augment.{i}"
        if entry.corrupt.strip() == f"missing:{ANY}":
            modality, name = ANY, "missing"
        else:
            try:
                modality, name = parse_corruption_spec(entry.corrupt)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            if modality not in modalities:
                raise ConfigError(f"{where}: " + unknown_choice("a modality of this run", modality, modalities))
        corruption = registry("corruptions").build(name, path=where)
        kind = None if modality == ANY else modalities[modality].kind
        if kind is not None:
            try:
                corruption.check_kind(kind)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err} (modality '{modality}' is {kind} data)") from None
        low, high = (entry.severity, entry.severity) if isinstance(entry.severity, (int, float)) else entry.severity
        out.append(Augmentation(entry.corrupt, modality, kind, corruption, float(entry.p), float(low), float(high),
                                zlib.crc32(f"{i}:{entry.corrupt}".encode())))
    return out


class AugmentedSplit(Dataset):
    """A training split whose items are corrupted by ``augmentations``; call :meth:`set_epoch`.

    The wrapped split is never modified. Attributes the loaders read (``ids``, ``on_bad_sample``,
    ``describe``, ``columns``) pass through.
    """

    def __init__(self, split: Dataset, augmentations: Sequence[Augmentation], seed: int):
        self.split = split
        self.augmentations = list(augmentations)
        self.seed = int(seed)
        self.epoch = 0
        for attr in ("ids", "on_bad_sample", "describe", "columns"):
            if hasattr(split, attr):
                setattr(self, attr, getattr(split, attr))

    def set_epoch(self, epoch: int) -> None:
        """Draw new corruptions for ``epoch`` (DataLoader workers are re-created each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.split[i]
        if "skip" in item or not self.augmentations:
            return item
        index = int(item["index"])
        inputs = dict(item["inputs"])  # a new dict: the split's own item is never modified
        for aug in self.augmentations:
            rng = np.random.default_rng([abs(self.seed), self.epoch, index, aug.key])
            if rng.random() >= aug.p:
                continue
            present = [m for m in sorted(inputs) if inputs[m] is not None]
            if aug.modality == ANY:
                if len(present) > 1:
                    inputs[present[int(rng.integers(len(present)))]] = None
                continue
            value = inputs.get(aug.modality)
            if value is None:
                continue
            severity = 1.0 if aug.corruption.drops_modality else aug.low + (aug.high - aug.low) * rng.random()
            out = aug.corruption(value, severity, rng, aug.kind)
            if out is None and len(present) == 1:
                continue  # never drop the last present modality
            inputs[aug.modality] = out
        return {**item, "inputs": inputs}
