"""Frozen encoders the feature cache stands in for, without building or loading them.

A warm feature cache makes a frozen encoder's forward pass unnecessary, and then building it
(importing transformers, reading 90 MB of MiniLM weights) is most of what is left of a run.
:class:`EncoderBuilder` is the ``make_encoder`` of :func:`fusionkit.model.build_model` when the
cache is on. For a modality whose encoder takes every weight from files its config names
(:meth:`fusionkit.encoders.base.Encoder.weight_files`) it keeps a build record::

    <root>/builds/<build key>.json   {digest, out_dim, token_dim, rng_after}

- build key: sha256 of the encoder block, the modality spec, each weight file's path, size and
  modification time, the versions of torch, timm and transformers, the source of the encoder
  modules, and the random-number states before the build (an encoder built at another point of
  the model's construction is another build);
- digest: :func:`~fusionkit.encoders.base.weights_digest` of the built encoder, the half of the
  feature cache's encoder key that needs its weights;
- rng_after: the torch, numpy and Python random states right after the build, restored when the
  build is skipped, so every module built after it (projectors, fusion, decoder) gets the same
  initial weights as with the real encoder: a warm run is the same run.

With a record and every sample of every split in the cache, the modality gets a
:class:`CachedEncoder` (no weights; it carries the cached features to
:func:`fusionkit.training.trainer.use_feature_cache`). Otherwise the encoder is built as usual
and the record is written. Checkpoints never hold such an encoder's weights (they are rebuilt
from the config and checked against the digest), so the stand-in changes nothing saved.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import random
import secrets
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionkit.data.cache import CacheStats, encoder_key, precompute
from fusionkit.encoders.base import Encoder, ModalitySpec, weights_digest
from fusionkit.errors import ConfigError
from fusionkit.registry import registry

_VERSIONED = ("torch", "timm", "transformers", "open_clip_torch", "safetensors")


class CachedEncoder(Encoder):
    """Stands in for a frozen encoder whose features of every sample are in the feature cache.

    It has no weights and cannot encode; batches hold the encoder's features instead
    (:class:`fusionkit.data.cache.CachedSplit`). :meth:`materialize` builds the real encoder.

    Args:
        config, spec: the real encoder's validated config and modality spec.
        block: the real encoder's config block (for :meth:`materialize` and the cache keys).
        out_dim, token_dim: the real encoder's widths.
        digest: the real encoder's :func:`~fusionkit.encoders.base.weights_digest`.
        features: split name -> per-sample features, as :func:`~fusionkit.data.cache.precompute` returns.
    """

    def __init__(self, config, *, spec: ModalitySpec, block: dict[str, Any], out_dim: int, token_dim: int,
                 digest: str, features: dict[str, list[Any]] | None = None):
        super().__init__(config, spec=spec)
        self.block = block
        self.out_dim = out_dim
        self._token_dim = token_dim
        self.digest = digest
        self.features = features or {}

    @classmethod
    def replacing(cls, encoder: Encoder, block: dict[str, Any], digest: str) -> CachedEncoder:
        """A stand-in for ``encoder`` (built, frozen): its weights can go once its features are cached."""
        return cls(encoder.config, spec=encoder.spec, block=block, out_dim=encoder.out_dim,
                   token_dim=encoder.token_dim, digest=digest)

    @property
    def token_dim(self) -> int:
        return self._token_dim

    @property
    def rebuilt(self) -> bool:
        return True  # the encoder it stands for is rebuilt from its config

    def preprocess(self, raw: Any) -> Any:
        raise ConfigError(self._why())

    def forward(self, x: Any):
        raise ConfigError(self._why())

    def _why(self) -> str:
        return (f"encoder '{self.block.get('name')}' was not built: its features come from the feature cache; "
                f"load the run with fusionkit.training.trainer.load_run to encode new inputs")

    def materialize(self) -> Encoder:
        """The real encoder, built from the config (its weights come from files, so no random
        state is involved) and checked against the digest."""
        encoder = registry("encoders").build(self.block, "feature cache", spec=self.spec)
        if weights_digest(encoder) != self.digest:
            raise ConfigError(f"encoder '{self.block.get('name')}' built again has other weights than when its "
                              f"features were cached; its weights file changed during the run")
        return encoder


class EncoderBuilder:
    """``make_encoder`` for :func:`fusionkit.model.build_model` with the feature cache on.

    Args:
        root: the feature cache folder.
        splits: the run's splits by name (their content decides whether every feature is cached).
        tokens: the decoder reads token sequences (token entries of the cache).
        live: modalities whose encoder runs on every batch (``train.augment`` rewrites them):
            always built.
        workers: DataLoader workers that decode media files while their content keys are looked up.
    """

    def __init__(self, root: Path, splits: dict[str, Dataset], tokens: bool, live: set[str] = frozenset(),
                 workers: int = 0):
        self.root = Path(root)
        self.splits = splits
        self.tokens = tokens
        self.live = set(live)
        self.workers = workers
        self.digests: dict[str, str] = {}  # modality -> weights digest, of built and stood-in encoders

    def __call__(self, modality: str, block: dict[str, Any], spec: ModalitySpec) -> Encoder:
        cls, config = registry("encoders").validate(block, f"model.encoders.{modality}")
        files = None if modality in self.live else cls.weight_files(config)
        if not files:
            return cls.from_config(config, spec=spec)
        before = rng_states()
        path = self.root / "builds" / f"{build_key(cls, block, spec, files, before)}.json"
        record = _read_json(path)
        after = _parse_states(record["rng_after"]) if record is not None else None
        if after is not None:
            features = self._cached(modality, block, record["digest"])
            if features is not None:
                set_rng_states(after)
                self.digests[modality] = record["digest"]
                return CachedEncoder(config, spec=spec, block=block, out_dim=record["out_dim"],
                                     token_dim=record["token_dim"], digest=record["digest"], features=features)
        encoder = cls.from_config(config, spec=spec)
        if encoder.rebuilt:
            self.digests[modality] = digest = weights_digest(encoder)
            _write_json(path, {"digest": digest, "out_dim": int(encoder.out_dim),
                               "token_dim": int(encoder.token_dim), "rng_after": rng_states()})
        return encoder

    def _cached(self, modality: str, block: dict[str, Any], digest: str) -> dict[str, list[Any]] | None:
        """The cached features of every split, or None as soon as one sample's is missing."""
        key = encoder_key(digest, block)
        features = {}
        for name, split in self.splits.items():
            # one worker would only wait on the file reads with us: decoding ahead needs two or more
            feats = precompute(None, block, split, modality, self.root, CacheStats(), tokens=self.tokens, key=key,
                               workers=self.workers if self.workers > 1 else 0)
            if feats is None:
                return None
            features[name] = feats
        return features


def build_key(cls: type, block: dict[str, Any], spec: ModalitySpec, files: list[Path], rng: dict[str, Any]) -> str:
    """sha256 of everything an encoder build depends on (see the module docstring)."""
    h = hashlib.sha256()
    stats = [(str(f), *(lambda s: (s.st_size, s.st_mtime_ns))(os.stat(f))) for f in files]
    h.update(json.dumps({"block": block, "spec": asdict(spec), "files": stats, "versions": _versions(),
                         "rng": rng}, sort_keys=True, default=str).encode())
    sources = {Path(__file__).parents[1] / "encoders" / "base.py", Path(inspect.getfile(cls))}
    sources |= set((Path(__file__).parents[1] / "encoders").glob("*.py"))  # encoders build one another
    for source in sorted(sources):
        h.update(source.read_bytes())
    return h.hexdigest()[:32]


@functools.cache
def _versions() -> dict[str, str | None]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def rng_states() -> dict[str, Any]:
    """The torch (CPU), numpy and Python random states, as JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state().numpy().tobytes().hex(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(state), py_gauss]}


def _parse_states(states: Any) -> tuple | None:
    """What :func:`rng_states` returned, as the RNGs take it; None if it is damaged."""
    try:
        torch_state = torch.from_numpy(np.frombuffer(bytes.fromhex(states["torch"]), dtype=np.uint8).copy())
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        version, state, py_gauss = states["python"]
        return torch_state, (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss), \
            (version, tuple(state), py_gauss)
    except (KeyError, TypeError, ValueError):
        return None


def set_rng_states(states: tuple) -> None:
    """Restore the states :func:`_parse_states` read from a record."""
    torch_state, numpy_state, python_state = states
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or damaged: build the encoder (and write the record again)
    wanted = {"digest", "out_dim", "token_dim", "rng_after"}
    return record if isinstance(record, dict) and wanted <= record.keys() else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
