"""On-disk cache of frozen encoders' outputs (``fusionkit train --cache-features``).

A frozen encoder in eval mode is a fixed function of its input, so its output for a sample can
be computed once and reused by later epochs and later runs. Features are keyed by

- encoder key: sha256 of the encoder's resolved config block and of every tensor of its
  state (weights and buffers), so another model, other weights or other preprocessing settings
  never share entries;
- content key: sha256 of the sample's raw value as the dataset hands it to the encoder (the
  decoded image, waveform or frames; the text; the vector), so a file whose content changes
  gets a new entry and the stale one is simply never read again.

They are stored one file per split and encoder (:mod:`fusionkit.data.feature_packs`), pooled
vectors ``(d,)`` or, for decoders that read sequences (``precompute(..., tokens=True)``), pairs
``(pooled (d,), tokens (L_i, token_dim))`` holding the real tokens only (padding dropped), in
files of their own. :class:`PrecomputedEncoder` with ``token_dim`` pads them back into an
:class:`~fusionkit.encoders.base.EncoderOutput` batch.

Only encoders with no trainable parameter are cached; a fine-tuned encoder changes every step.
When every feature of a run is cached, the encoder is not even built
(:mod:`fusionkit.data.cached_encoders`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fusionkit.data.feature_packs import PackStore
from fusionkit.data.loader import MEDIA_KINDS, ordered_items
from fusionkit.encoders.base import Encoder, EncoderOutput, weights_digest


def default_root() -> Path:
    """Where features are cached without ``train.cache_dir``: ``$FUSIONKIT_FEATURE_CACHE``, else
    ``${FUSIONKIT_CACHE:-~/.cache/fusionkit}/features``."""
    if os.environ.get("FUSIONKIT_FEATURE_CACHE"):
        return Path(os.environ["FUSIONKIT_FEATURE_CACHE"])
    return Path(os.environ.get("FUSIONKIT_CACHE", Path.home() / ".cache" / "fusionkit")) / "features"


def encoder_key(weights: Encoder | str, block: dict[str, Any]) -> str:
    """Fingerprint of an encoder: its config block and all of its weights and buffers.

    ``weights``: the encoder, or its :func:`~fusionkit.encoders.base.weights_digest` when known
    (hashing a large model once per run is enough).
    """
    digest = weights if isinstance(weights, str) else weights_digest(weights)
    h = hashlib.sha256(json.dumps(block, sort_keys=True, default=str).encode())
    h.update(digest.encode())
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


@torch.no_grad()
def precompute(encoder: Encoder | None, block: dict[str, Any], split: Dataset, modality: str, root: Path,
               stats: CacheStats, batch_size: int = 64, tokens: bool = False, *, key: str | None = None,
               device: torch.device | str | None = None, workers: int = 0) -> list[Any] | None:
    """Features of ``modality`` for every sample of ``split`` (None where it is missing).

    Cached entries are read; the rest are encoded in batches and the split's pack is written.
    Only this modality's column is decoded. A sample whose value fails to decode under
    ``on_bad_sample: skip`` gets the split's skip record (a dict with ``"skip"``) instead of a
    feature, so :class:`CachedSplit` reports it as skipped, exactly as the uncached loader does.
    A sample repeated in the split is encoded once (its repeats count as hits).

    Args:
        encoder: the frozen encoder; None only looks up: the features, or None if any is missing.
        tokens: False: each feature is the pooled vector ``(d,)`` (``encoder(batch)``). True: each
            is the pair ``(pooled (d,), tokens (L_i, token_dim))`` from ``encoder.encode(batch)``,
            the tokens without padding; read it back with ``PrecomputedEncoder(d, token_dim)``.
        key: the :func:`encoder_key`, if the caller has it (else the encoder's weights are hashed).
        device: where to encode (the run's device; the encoder is moved there); default: where
            the encoder's weights are.
        workers: DataLoader workers that decode the samples ahead (media files only).
    """
    store = PackStore(Path(root) / (key or encoder_key(encoder, block)), tokens)
    known = store.index()
    slots: list[Any] = [None] * len(split)  # per sample: content key, skip record, or None (missing)
    pending: dict[str, Any] = {}  # content key -> raw value, waiting for a batch
    computed: dict[str, Any] = {}
    if encoder is not None:
        was_training = encoder.training
        encoder.eval()
        if device is not None:
            encoder.to(device)
        device = next((p.device for p in encoder.parameters()), torch.device(device or "cpu"))

    def flush() -> None:
        computed.update(_encode(encoder, pending, tokens, device))
        pending.clear()

    others = set(getattr(split, "columns", ())) - {modality}
    view = _blank_columns(split, others)  # decode this modality only
    media = (getattr(split, "kinds", None) or {}).get(modality) in MEDIA_KINDS
    for i, item in enumerate(ordered_items(view, workers if media else 0)):
        if "skip" in item:
            slots[i] = item  # the value could not be decoded: the row is reported, never silently dropped
            continue
        raw = item.get("inputs", {}).get(modality)
        if raw is None:
            continue
        slots[i] = k = content_key(raw)
        if k in known or k in computed or k in pending:
            continue
        if encoder is None:
            return None  # a lookup only, and this sample is not cached
        pending[k] = raw
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if encoder is not None:
        encoder.train(was_training)
    present = [s for s in slots if isinstance(s, str)]
    stored = store.read([k for k in dict.fromkeys(present) if k not in computed], own=present)
    if stored is None:  # a damaged pack was deleted: look again, computing its samples anew
        return precompute(encoder, block, split, modality, root, stats, batch_size, tokens, key=key, device=device,
                          workers=workers) if encoder is not None else None
    features = {**stored, **computed}
    if present and (computed or not store.path(present).is_file()):
        store.write(present, features)  # next time this split is one file
    stats.add(modality, len(present) - len(computed), len(computed))
    return [features[s] if isinstance(s, str) else s for s in slots]


def _encode(encoder: Encoder, pending: dict[str, Any], tokens: bool, device) -> dict[str, Any]:
    """Content key -> feature for a batch of raw values (pooled, or (pooled, real tokens))."""
    batch = encoder.collate([encoder.preprocess(raw) for raw in pending.values()])
    batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
    if tokens:
        encoded = encoder.encode(batch)  # pooled (n, d), tokens (n, L, token_dim), mask (n, L)
        pooled, toks, mask = encoded.pooled.float().cpu(), encoded.tokens.float().cpu(), encoded.token_mask.cpu()
        # (L, token_dim) -> (L_i, token_dim): padded positions dropped
        return {k: (p, t[m].clone()) for k, p, t, m in zip(pending, pooled, toks, mask)}
    feats = encoder(batch).float().cpu()  # (n, out_dim)
    return dict(zip(pending, feats))


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
