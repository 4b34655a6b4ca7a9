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

Token entries (``precompute(..., tokens=True)``, for decoders that read sequences) sit next to
them as ``<content key>.tokens.npz`` holding ``pooled (d,)`` and the real tokens only
``(L_i, token_dim)`` (padding dropped); the other suffix keeps them apart from pooled-only
entries of the same encoder and sample. :class:`PrecomputedEncoder` with ``token_dim`` pads
them back into an :class:`~fusionkit.encoders.base.EncoderOutput` batch.

Only encoders with no trainable parameter are cached; a fine-tuned encoder changes every step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fusionkit.encoders.base import Encoder, EncoderOutput


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

    def path(self, content: str, tokens: bool = False) -> Path:
        return self.dir / (f"{content}.tokens.npz" if tokens else f"{content}.npy")

    def get(self, content: str) -> Tensor | None:
        p = self.path(content)
        if not p.is_file():
            return None
        try:
            return torch.from_numpy(np.load(p, allow_pickle=False))
        except (ValueError, OSError):  # a damaged entry is recomputed, never trusted
            return None

    def put(self, content: str, feature: Tensor) -> None:
        self._write(self.path(content), lambda f: np.save(f, _array(feature), allow_pickle=False))

    def get_tokens(self, content: str) -> tuple[Tensor, Tensor] | None:
        """``(pooled (d,), tokens (L_i, token_dim))`` of a sample, or None if not cached."""
        p = self.path(content, tokens=True)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as entry:
                return torch.from_numpy(entry["pooled"]), torch.from_numpy(entry["tokens"])
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile):  # a damaged entry is recomputed
            return None

    def put_tokens(self, content: str, pooled: Tensor, tokens: Tensor) -> None:
        self._write(self.path(content, tokens=True),
                    lambda f: np.savez(f, pooled=_array(pooled), tokens=_array(tokens)))

    def _write(self, path: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # atomic: readers never see half a file


def _array(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


@torch.no_grad()
def precompute(encoder: Encoder, block: dict[str, Any], split: Dataset, modality: str, root: Path,
               stats: CacheStats, batch_size: int = 64, tokens: bool = False) -> list[Any]:
    """Features of ``modality`` for every sample of ``split`` (None where it is missing).

    Cached entries are read; the rest are encoded in batches and written. Only this modality's
    column is decoded. A sample whose value fails to decode under ``on_bad_sample: skip`` gets the
    split's skip record (a dict with ``"skip"``) instead of a feature, so :class:`CachedSplit`
    reports it as skipped, exactly as the uncached loader does.

    Args:
        tokens: False: each feature is the pooled vector ``(d,)`` (``encoder(batch)``). True: each
            is the pair ``(pooled (d,), tokens (L_i, token_dim))`` from ``encoder.encode(batch)``,
            the tokens without padding; read it back with ``PrecomputedEncoder(d, token_dim)``.
    """
    cache = FeatureCache(root, encoder_key(encoder, block))
    read = cache.get_tokens if tokens else cache.get
    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    out: list[Any] = [None] * len(split)
    pending: list[tuple[int, str, Any]] = []
    counts = {"hits": 0, "misses": 0}

    def flush() -> None:
        counts["misses"] += len(pending)
        batch = encoder.collate([encoder.preprocess(raw) for _, _, raw in pending])
        batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
        if tokens:
            encoded = encoder.encode(batch)  # pooled (n, d), tokens (n, L, token_dim), mask (n, L)
            pooled, toks, mask = encoded.pooled.float().cpu(), encoded.tokens.float().cpu(), encoded.token_mask.cpu()
            for (i, key, _), p, t, m in zip(pending, pooled, toks, mask):
                real = t[m].clone()  # (L, token_dim) -> (L_i, token_dim): padded positions dropped
                cache.put_tokens(key, p, real)
                out[i] = (p, real)
        else:
            feats = encoder(batch).float().cpu()  # (n, out_dim)
            for (i, key, _), f in zip(pending, feats):
                cache.put(key, f)
                out[i] = f
        pending.clear()

    others = set(getattr(split, "columns", ())) - {modality}
    split = _blank_columns(split, others)  # decode this modality only
    for i in range(len(split)):
        item = split[i]
        if "skip" in item:
            out[i] = item  # the value could not be decoded: the row is reported, never silently dropped
            continue
        raw = item.get("inputs", {}).get(modality)
        if raw is None:
            continue
        key = content_key(raw)
        cached = read(key)
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


def _blank_columns(split, blank: set[str]):
    """A shallow copy of ``split`` whose ``blank`` columns read as missing, so their raw values
    are never decoded. Every row stays where it is (feature ``i`` belongs to sample ``i``), even a
    row whose other modalities are all missing; ``select`` would leave such rows out."""
    if not blank or not hasattr(split, "columns"):
        return split
    view = copy.copy(split)
    view.columns = {m: [None] * len(v) if m in blank else v for m, v in split.columns.items()}
    return view


class CachedSplit(Dataset):
    """A split whose cached modalities come from precomputed features (raw values are not read).

    A feature is passed on as it is: a pooled tensor, or a ``(pooled, tokens)`` pair; a skip
    record from :func:`precompute` makes the whole sample a skipped one.
    """

    def __init__(self, split, features: dict[str, list[Any]]):
        self.features = features
        self.split = _blank_columns(split, set(features))
        for attr in ("ids", "on_bad_sample", "describe"):
            if hasattr(split, attr):
                setattr(self, attr, getattr(split, attr))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        failed = next((f[i] for f in self.features.values() if isinstance(f[i], dict)), None)
        if failed is not None:
            return failed  # a cached modality's file failed to decode while precomputing (skip mode)
        item = self.split[i]
        if "skip" in item:
            return item
        inputs = dict(item["inputs"])
        for m, feats in self.features.items():
            inputs[m] = feats[i]
        return {**item, "inputs": inputs}


class PrecomputedEncoder:
    """Stands in for a cached encoder in the data pipeline: features pass through, stacked.

    Args:
        out_dim: width of the pooled features.
        token_dim: None: features are pooled tensors and ``collate`` stacks them. Set: features
            are ``(pooled, tokens)`` pairs (``precompute(..., tokens=True)``) and ``collate``
            returns an :class:`EncoderOutput` with the tokens right-padded with zeros.
    """

    def __init__(self, out_dim: int, token_dim: int | None = None):
        self.out_dim = out_dim
        self.token_dim = token_dim

    def preprocess(self, feature: Any) -> Any:
        return feature

    def collate(self, items: list[Any]) -> Tensor | EncoderOutput:
        if self.token_dim is None:
            return torch.stack(items)  # (n, out_dim)
        pooled = torch.stack([p for p, _ in items])  # (n, out_dim)
        lengths = torch.tensor([t.shape[0] for _, t in items])  # (n,)
        tokens = pooled.new_zeros(len(items), int(lengths.max()), self.token_dim)  # (n, L_max, token_dim)
        for i, (_, t) in enumerate(items):
            tokens[i, : t.shape[0]] = t  # (L_i, token_dim) into row i; the rest stays zero
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]  # (n, L_max), True = a real token
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)
