"""The feature cache's files: one safetensors "pack" per split and encoder.

A pack holds the features of one split's samples for one encoder, each distinct sample once::

    <root>/<encoder key>/<list key>.pooled.safetensors   keys (N, 32) uint8, features (N, d)
    <root>/<encoder key>/<list key>.tokens.safetensors   keys, pooled (N, d), tokens (T, token_dim),
                                                         offsets (N + 1,): sample r's tokens are
                                                         tokens[offsets[r]:offsets[r + 1]]

``keys`` are the samples' content keys (sha256 digests, see :func:`fusionkit.data.cache.content_key`);
the list key is the sha256 of the split's content keys in order, so a run over the same data
opens exactly one file per split and encoder (one read instead of one ``np.load`` per sample). A
split that changed reuses the rows of every other pack of the encoder whose keys it finds.

The header's metadata carries a sha256 of all tensors: a truncated, damaged or foreign file fails
to open or to match it, is deleted, and its samples are computed again. Files are written to a
temporary name and renamed, so readers never see half a pack; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "fusionkit-features/1"


def list_key(keys: list[str]) -> str:
    """The name of the pack of a split whose samples have content keys ``keys`` (in order)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]


def _checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.contiguous().numpy().reshape(-1).view(np.uint8))
    return h.hexdigest()


class PackStore:
    """The packs of one encoder (the folder ``root/<encoder key>``) of one kind.

    Args:
        directory: the encoder's folder (created on the first write).
        tokens: False: pooled features ``(d,)``; True: ``(pooled (d,), tokens (L_i, token_dim))`` pairs.
    """

    def __init__(self, directory: Path, tokens: bool = False):
        self.dir = Path(directory)
        self.tokens = tokens
        self.suffix = ".tokens.safetensors" if tokens else ".pooled.safetensors"
        self._index: dict[str, Path] | None = None

    def path(self, keys: list[str]) -> Path:
        return self.dir / f"{list_key(keys)}{self.suffix}"

    def index(self) -> dict[str, Path]:
        """Content key -> a pack that holds it, over every pack of this kind (read once: keys only)."""
        if self._index is None:
            index: dict[str, Path] = {}
            for path in sorted(self.dir.glob(f"*{self.suffix}")) if self.dir.is_dir() else ():
                try:
                    with safe_open(str(path), "pt") as f:
                        keys = f.get_tensor("keys").numpy()
                except (SafetensorError, OSError, ValueError, KeyError):
                    path.unlink(missing_ok=True)  # not a pack (any more): its samples are computed anew
                    continue
                for row in keys:
                    index.setdefault(row.tobytes().hex(), path)
            self._index = index
        return self._index

    def read(self, keys: list[str], own: list[str] | None = None) -> dict[str, Any] | None:
        """Features of ``keys`` (all of them in :meth:`index`, or in the pack of ``own``).

        ``own``: the split's content keys in order; when its pack exists only that file is read.
        Returns None when a pack failed its checksum: it is deleted, so looking again computes
        its samples anew.
        """
        wanted = set(keys)
        if not wanted:
            return {}
        by_pack: dict[Path, list[str]] = {}
        own_path = self.path(own) if own else None
        if own_path is not None and own_path.is_file():
            by_pack[own_path] = list(wanted)
        else:
            index = self.index()
            for k in wanted:
                by_pack.setdefault(index[k], []).append(k)
        found: dict[str, Any] = {}
        for path, ks in by_pack.items():
            rows = self._load(path)
            if rows is None or not all(k in rows for k in ks):
                self._discard(path)
                return None
            found.update((k, rows[k]) for k in ks)
        return found

    def write(self, keys: list[str], features: dict[str, Any]) -> None:
        """Write the pack of a split with content keys ``keys`` (in order; repeats allowed)."""
        unique = list(dict.fromkeys(keys))
        digests = torch.from_numpy(np.frombuffer(b"".join(bytes.fromhex(k) for k in unique), dtype=np.uint8)
                                   .reshape(len(unique), 32).copy())  # (N, 32)
        if self.tokens:
            pooled = torch.stack([features[k][0].float() for k in unique])  # (N, d)
            parts = [features[k][1].float() for k in unique]  # (L_i, token_dim) each
            lengths = torch.tensor([0] + [p.shape[0] for p in parts], dtype=torch.long)
            tensors = {"keys": digests, "pooled": pooled, "tokens": torch.cat(parts),  # (sum L_i, token_dim)
                       "offsets": lengths.cumsum(0)}  # (N + 1,)
        else:
            tensors = {"keys": digests, "features": torch.stack([features[k].float() for k in unique])}  # (N, d)
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(keys)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "sha256": _checksum(tensors)})
            os.replace(tmp, path)  # atomic: readers never see half a pack
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self._index is not None:
            for k in unique:
                self._index.setdefault(k, path)

    def _load(self, path: Path) -> dict[str, Any] | None:
        """Content key -> feature of one pack, or None if it is damaged (checksum, layout)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            if meta.get("format") != FORMAT or meta.get("sha256") != _checksum(tensors):
                return None
            keys = [row.tobytes().hex() for row in tensors["keys"].numpy()]
            if self.tokens:
                pooled, tokens, offsets = tensors["pooled"], tensors["tokens"], tensors["offsets"].tolist()
                return {k: (pooled[r], tokens[offsets[r]:offsets[r + 1]]) for r, k in enumerate(keys)}
            return dict(zip(keys, tensors["features"].unbind(0)))
        except (SafetensorError, OSError, ValueError, KeyError, IndexError, RuntimeError):
            return None

    def _discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._index = None
