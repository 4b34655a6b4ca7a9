"""Datasets: named sources of multimodal samples with a fixed train/val/test split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from fusionkit.encoders.base import ModalitySpec


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MultimodalSplit(Dataset):
    """One split: ``item = {"inputs": {modality: raw value or None}, "target": int, "index": int}``.

    Args:
        columns: modality -> list of raw values (None = that sample lacks the modality).
        targets: class index per sample.
    """

    def __init__(self, columns: dict[str, list[Any]], targets: list[int], ids: list[Any] | None = None):
        n = len(targets)
        for m, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {m} has {len(values)} values for {n} targets")
        self.columns = columns
        self.targets = list(targets)
        self.ids = list(ids) if ids is not None else list(range(n))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": {m: v[i] for m, v in self.columns.items()}, "target": self.targets[i], "index": i}

    def select(self, modalities: list[str]) -> "MultimodalSplit":
        """The same samples restricted to ``modalities``."""
        return MultimodalSplit({m: self.columns[m] for m in modalities}, self.targets, self.ids)


@dataclass
class DatasetBundle:
    """A loaded dataset: splits, classes and what each modality is."""

    splits: dict[str, MultimodalSplit]
    classes: list[str]
    modalities: dict[str, ModalitySpec]
    info: dict[str, Any] = field(default_factory=dict)


class MultimodalDataset:
    """Base class of registered datasets; subclasses implement :meth:`load`."""

    Config = DatasetConfig
    default_modalities: tuple[str, ...] = ()

    def __init__(self, config: BaseModel | None = None):
        self.config = config or self.Config()

    @classmethod
    def from_config(cls, config: BaseModel):
        return cls(config)

    @property
    def task(self) -> str:
        """The task this data is for (the default ``task`` block): the config's ``task`` field
        where the dataset offers several, else classification."""
        return getattr(self.config, "task", "classification")

    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Modalities this dataset offers, known without reading the data files."""
        raise NotImplementedError

    def default_encoders(self) -> dict[str, dict[str, Any]]:
        """Encoder block per modality used when the config names none."""
        return {}

    def load(self) -> DatasetBundle:
        raise NotImplementedError
