"""On-disk cache of frozen encoders' outputs (``fusionkit train --cache-features``).

A frozen encoder in eval mode is a fixed function of its input, so its output for a sample can
be computed once and reused by later epochs and later runs. Each feature is stored as one
``.npy`` file (read with ``allow_pickle=False``) at::

    <root>/<encoder key>/<content key>.npy

- encoder key: sha256 of the encoder's resolved config block and of every tensor of its
  state (weights and buffers), so another model, other weights or other preprocessing settings
  never share entries;
- content key: sha256 of the sample's raw value as the dataset hands it to the encoder (the
  decoded image, waveform or frames; the text; the vector), so a file whose content changes
  gets a new entry and the stale one is simply never read again.

Only encoders with no trainable parameter are cached; a fine-tuned encoder changes every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fusionkit.encoders.base import Encoder


def default_root() -> Path:
    return Path(os.environ.get("FUSIONKIT_CACHE", Path.home() / ".cache" / "fusionkit")) / "features"


def encoder_key(encoder: Encoder, block: dict[str, Any]) -> str:
    """Fingerprint of an encoder: its config block and all of its weights and buffers."""
    h = hashlib.sha256(json.dumps(block, sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def content_key(raw: Any) -> str:
    """sha256 of a raw sample value (str, PIL image, array, or a list of numbers)."""
    h = hashlib.sha256()
    if isinstance(raw, str):
        h.update(b"str:" + raw.encode())
    else:
        if hasattr(raw, "mode") and hasattr(raw, "tobytes"):  # PIL image
            h.update(f"pil:{raw.mode}:{raw.size}".encode())
            raw = raw.tobytes()
            h.update(raw)
            return h.hexdigest()
        arr = np.asarray(raw)
        h.update(f"arr:{arr.dtype}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    by_modality: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, modality: str, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        m = self.by_modality.setdefault(modality, {"hits": 0, "misses": 0})
        m["hits"] += hits
        m["misses"] += misses


class FeatureCache:
    """Read and write per-sample features of one encoder under ``root/<encoder key>``."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, content: str) -> Path:
        return self.dir / f"{content}.npy"

    def get(self, content: str) -> Tensor | None:
        p = self.path(content)
        if not p.is_file():
            return None
        try:
            return torch.from_numpy(np.load(p, allow_pickle=False))
        except (ValueError, OSError):  # a damaged entry is recomputed, never trusted
            return None

    def put(self, content: str, feature: Tensor) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, feature.detach().float().cpu().numpy(), allow_pickle=False)
        os.replace(tmp, self.path(content))  # atomic: readers never see half a file


@torch.no_grad()
def precompute(encoder: Encoder, block: dict[str, Any], split: Dataset, modality: str, root: Path,
               stats: CacheStats, batch_size: int = 64) -> list[Tensor | None]:
    """Features of ``modality`` for every sample of ``split`` (None where it is missing).

    Cached entries are read; the rest are encoded in batches and written.
    """
    cache = FeatureCache(root, encoder_key(encoder, block))
    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    out: list[Tensor | None] = [None] * len(split)
    pending: list[tuple[int, str, Any]] = []
    counts = {"hits": 0, "misses": 0}

    def flush() -> None:
        counts["misses"] += len(pending)
        batch = encoder.collate([encoder.preprocess(raw) for _, _, raw in pending])
        batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
        feats = encoder(batch).float().cpu()  # (n, out_dim)
        for (i, key, _), f in zip(pending, feats):
            cache.put(key, f)
            out[i] = f
        pending.clear()

    for i in range(len(split)):
        item = split[i]
        raw = item.get("inputs", {}).get(modality) if "skip" not in item else None
        if raw is None:
            continue
        key = content_key(raw)
        cached = cache.get(key)
        if cached is not None:
            out[i] = cached
            counts["hits"] += 1
            continue
        pending.append((i, key, raw))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    stats.add(modality, counts["hits"], counts["misses"])
    encoder.train(was_training)
    return out


class CachedSplit(Dataset):
    """A split whose cached modalities come from precomputed features (raw values are not read)."""

    def __init__(self, split, features: dict[str, list[Tensor | None]]):
        self.features = features
        rest = [m for m in split.columns if m not in features] if hasattr(split, "columns") else None
        self.split = split.select(rest) if rest is not None and hasattr(split, "select") else split
        for attr in ("ids", "on_bad_sample", "describe"):
            if hasattr(split, attr):
                setattr(self, attr, getattr(split, attr))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.split[i]
        if "skip" in item:
            return item
        inputs = dict(item["inputs"])
        for m, feats in self.features.items():
            inputs[m] = feats[i]
        return {**item, "inputs": inputs}


class PrecomputedEncoder:
    """Stands in for a cached encoder in the data pipeline: features pass through, stacked."""

    def __init__(self, out_dim: int):
        self.out_dim = out_dim

    def preprocess(self, feature: Tensor) -> Tensor:
        return feature

    def collate(self, items: list[Tensor]) -> Tensor:
        return torch.stack(items)  # (n, out_dim)
