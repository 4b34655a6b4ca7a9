"""WebDataset tar shards, streamed: samples are read shard by shard, never all at once.

```yaml
data:
  name: webdataset
  train: shards/train-{000000..000003}.tar     # brace ranges and globs; a list of patterns works too
  val: shards/val-000000.tar
  test: shards/test-{000000..000001}.tar
  modalities: {image: png, text: txt, audio: wav}   # modality: file extension in the sample
  label: cls                                       # the file holding the class: a name or an index
  shuffle_buffer: 1000                             # train only: samples held to shuffle
```

- A sample is the run of consecutive tar members sharing a key (the file name up to its first
  dot): ``000017.png``, ``000017.txt``, ``000017.cls``; the rest of the name is its extension.
- Kinds by extension: png/jpg/jpeg/bmp/webp image, wav/flac/ogg/mp3/m4a audio (resampled to
  ``sample_rate``), mp4/avi/mov/mkv/webm video, txt/text text (UTF-8), npy vector (one numeric
  row). ``seg.png`` counts by its last part. Without ``modalities``, every such extension in the
  first train shard becomes a modality named by its kind (by its extension when two share a kind).
  A sample without a modality's file lacks that modality.
- Classes: ``classes: [...]``, where the label file holds a class name or (when the names are
  not all integers) an index into the list; or, without ``classes``, the sorted labels found in
  the train shards (numeric order when all are integers: ``cls`` files 0..9 give classes "0".."9").
- Before training, each split's shards are read once to count samples (``len``) and to collect
  the train labels: tar headers and the label files only, not the media. ``size: {split: N}``
  skips counting that split (its length is then N); with ``classes`` given and every split sized,
  nothing is read before training.
- Splitting: shards go round-robin to DDP ranks, and a rank's shards round-robin to its
  DataLoader workers; with fewer shards than ranks (or workers) samples are dealt instead (each
  reads the shards and keeps every n-th sample). Every rank yields the same number of samples per
  epoch, so DDP steps stay in lockstep: short ranks repeat samples from their own shards (as
  ``DistributedSampler`` pads), or with ``size`` each rank reads exactly ``ceil(N / ranks)``.
- Shuffling (train only): shard order per epoch and a buffer of ``shuffle_buffer`` undecoded
  samples; val and test are read in order. Media are decoded after shuffling, in the workers.
- Streams have no random access: ``train.augment``, ``--cache-features`` and ``fusionkit
  robustness``/``weights`` need a map-style dataset (hf_datasets or a manifest).
"""

from __future__ import annotations

import copy
import io
import math
from collections import Counter
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from torch.utils.data import IterableDataset, get_worker_info

from fusionkit.data.shards import (ShardScan, buffer_shuffle, expand_shards, iter_samples, kept, plan, rank_world,
                                   scan_shards)
from fusionkit.datasets.base import ClassNames, DatasetBundle, DatasetConfig, MultimodalDataset, small_default_encoders
from fusionkit.datasets.manifest import EXTENSIONS, _sorted_labels
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError
from fusionkit.registry import register

SPLITS = ("train", "val", "test")


def ext_kind(ext: str) -> str | None:
    """Modality kind of a sample file extension (``seg.png`` counts by ``png``), or None."""
    last = ext.rsplit(".", 1)[-1].lower()
    if last in ("txt", "text"):
        return "text"
    return EXTENSIONS.get("." + last)


class WebDatasetConfig(DatasetConfig):
    train: str | list[str] = Field(..., description="train shards: a path pattern ({000..009} ranges, globs) or a list")
    val: str | list[str] = Field(..., description="validation shards (same forms as train)")
    test: str | list[str] = Field(..., description="test shards (same forms as train)")
    modalities: dict[str, str] | None = Field(None, description=(
        "modality name -> file extension in a sample (png, txt, wav, npy ...); None = every known "
        "extension in the first train shard"))
    label: str = Field("cls", description="extension of the file holding each sample's class (a name or an index)")
    classes: ClassNames = Field(None, description=(
        "class names in index order; None = the sorted labels of the train shards (read once)"))
    shuffle_buffer: int = Field(1000, ge=0, description=(
        "train only: undecoded samples held to shuffle (0 = shard order shuffling only)"))
    seed: int = Field(0, description="fixes the shard order and buffer shuffles, with the epoch")
    size: dict[Literal["train", "val", "test"], int] | None = Field(None, description=(
        "samples per split, for splits that should not be counted before training (len = this)"))
    sample_rate: int = Field(16000, ge=1, description="audio is resampled to this rate (Hz)")
    max_frames: int = Field(32, ge=1, description="video frames kept per clip, spread uniformly (bounds memory)")
    on_bad_sample: Literal["error", "skip"] = Field("error", description=(
        "error: stop at the first bad sample; skip: leave it out and report it (skipped.json)"))

    @field_validator("train", "val", "test")
    @classmethod
    def _absolute(cls, v: str | list[str]) -> list[str]:
        # stored absolute, so a run folder's config.yaml keeps working from any directory
        patterns = [v] if isinstance(v, str) else v
        if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
            raise ValueError("give a shard path pattern or a non-empty list of them")
        return [str(Path(p).expanduser().absolute()) for p in patterns]

    @model_validator(mode="after")
    def _checks(self):
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes has duplicate names")
        if self.size is not None and any(n < 1 for n in self.size.values()):
            raise ValueError("size: every split needs at least one sample")
        if self.modalities is not None:
            for m, ext in self.modalities.items():
                if ext == self.label:
                    raise ValueError(f"modalities.{m}: '{ext}' is the label's extension (label)")
                if ext_kind(ext) is None:
                    raise ValueError(f"modalities.{m}: cannot tell the kind of '.{ext}' files; use png/jpg/jpeg/"
                                     f"bmp/webp (image), wav/flac/ogg/mp3/m4a (audio), mp4/avi/mov/mkv/webm "
                                     f"(video), txt (text) or npy (vector)")
        return self


# -- the split ------------------------------------------------------------------------------------
class WebDatasetSplit(IterableDataset):
    """One split streamed from tar shards; items are ``{"inputs", "target", "index", "id"}``.

    ``id`` is ``"<shard file>:<key>"``; ``index`` the sample's position in the split's shard order
    (``shard * 10**9 + position`` when the split was not counted). ``targets`` holds the class of
    every sample when all splits were counted (else it is empty).
    """

    def __init__(self, shards: list[str], *, name: str, modalities: dict[str, str], kinds: dict[str, str],
                 dims: dict[str, int], label: str, classes: list[str], counts: list[int] | None,
                 size: int | None, shuffle: bool, shuffle_buffer: int, seed: int, sample_rate: int,
                 max_frames: int, on_bad_sample: str, targets: list[int] | None = None):
        self.shards = shards
        self.name = name
        self.modalities = modalities  # modality -> extension
        self.kinds = kinds
        self.dims = dims
        self.label = label
        self.classes = classes
        self.counts = counts
        self.size = size
        self.shuffle = shuffle  # train: shard order and a sample buffer, new each epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.sample_rate = sample_rate
        self.max_frames = max_frames
        self.on_bad_sample = on_bad_sample
        self.targets = targets or []
        self.index = {c: k for k, c in enumerate(classes)}
        self.epoch = 0

    def select(self, modalities: list[str]) -> "WebDatasetSplit":
        """The same samples restricted to ``modalities`` (a sample with none of them is skipped and reported)."""
        view = copy.copy(self)
        view.modalities = {m: self.modalities[m] for m in modalities}
        return view

    def __getitem__(self, i: int):
        raise DataError("a webdataset split is streamed and has no random access; train.augment, "
                        "--cache-features and robustness/weights need a map-style dataset "
                        "(hf_datasets or a manifest)")

    # -- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Samples this rank yields per epoch (exact with one DataLoader worker)."""
        _, world = rank_world()
        if self.counts is None:
            return math.ceil(self.size / world)
        return self.quotas(world, 1)[0] if world > 1 else sum(self.counts)

    def quotas(self, world: int, workers: int) -> list[int]:
        """Samples worker ``w`` of every rank yields: the most any rank's worker ``w`` holds."""
        return [max(kept(self.counts, *plan(len(self.shards), r, world, w, workers)) for r in range(world))
                for w in range(workers)]

    # -- reading -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        base = info.seed - info.id if info is not None else 0  # the loader's per-epoch seed, shared by its workers
        self.epoch += 1
        rng = np.random.default_rng([self.seed, base % 2**63, self.epoch, rank, worker])
        yield from self.partition(rank, world, worker, workers, rng)

    def partition(self, rank: int, world: int, worker: int, workers: int,
                  rng: np.random.Generator | None = None) -> Iterator[dict[str, Any]]:
        """The items of one (rank, worker) part for one epoch (``rng``: shuffling; None = in order)."""
        shards, every, offset = plan(len(self.shards), rank, world, worker, workers)
        quota = None
        if world > 1 and self.counts is not None:
            quota = self.quotas(world, workers)[worker]
            if quota and not kept(self.counts, shards, every, offset):
                raise DataError(f"data.{self.name}: {sum(self.counts)} samples in {len(self.shards)} shards "
                                f"cannot be spread over {world} ranks x {workers} DataLoader workers; "
                                f"use fewer workers or more shards")
        elif world > 1:
            share = math.ceil(self.size / world)
            quota = share // workers + (worker < share % workers)
        shuffle = rng is not None and self.shuffle
        if shuffle and every == 1:
            shards = [shards[j] for j in rng.permutation(len(shards))]
        raw = self._raw(shards, every, offset, quota)
        if shuffle and self.shuffle_buffer > 1:
            raw = buffer_shuffle(raw, self.shuffle_buffer, rng)
        for shard, key, index, files in raw:
            yield self._item(shard, key, index, files)

    def _raw(self, shards: list[int], every: int, offset: int, quota: int | None):
        """``(shard, key, index, files)`` of the part's samples; with ``quota``, exactly that many
        (re-reading the part from its start, or stopping early)."""
        prefix = np.cumsum([0, *self.counts]) if self.counts is not None else None
        yielded = 0
        while True:
            ordinal, before = 0, yielded
            for s in shards:
                for pos, (key, files) in enumerate(iter_samples(self.shards[s])):
                    keep = ordinal % every == offset
                    ordinal += 1
                    if not keep:
                        continue
                    if quota is not None and yielded >= quota:
                        return
                    index = int(prefix[s]) + pos if prefix is not None else s * 10**9 + pos
                    yield s, key, index, files
                    yielded += 1
            if quota is None or yielded >= quota or yielded == before:
                return

    def _item(self, s: int, key: str, index: int, files: dict[str, bytes]) -> dict[str, Any]:
        ident = f"{Path(self.shards[s]).name}:{key}"
        try:
            target = self._target(files)
            inputs = {m: self._decode(m, files.get(ext), f"{ident}.{ext}") for m, ext in self.modalities.items()}
            if all(v is None for v in inputs.values()):
                # not a bad sample, just unusable for this choice of modalities: always reported
                return {"skip": f"none of the chosen modalities {sorted(self.modalities)} is present "
                                f"(files: {', '.join(sorted(files))})", "id": ident, "index": index}
        except DataError as err:
            if self.on_bad_sample == "skip":
                return {"skip": str(err), "id": ident, "index": index}
            raise DataError(f"webdataset shard '{self.shards[s]}' sample '{key}': {err}") from None
        return {"inputs": inputs, "target": target, "index": index, "id": ident}

    def _target(self, files: dict[str, bytes]) -> int:
        data = files.get(self.label)
        if data is None:
            raise DataError(f"has no '.{self.label}' file (data.label); its files: {', '.join(sorted(files))}")
        return class_index(data.decode("utf-8", "replace").strip(), self.index, self.classes)

    def _decode(self, m: str, data: bytes | None, name: str) -> Any:
        from fusionkit.data import media

        if data is None:
            return None
        kind = self.kinds[m]
        if kind == "image":
            return media.decode_image(data, name)
        if kind == "audio":
            return media.decode_audio(data, name, self.sample_rate)  # (C, T) float32
        if kind == "video":
            return media.decode_video(data, name, self.max_frames)[0]  # (F, H, W, 3) uint8
        if kind == "text":
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"text '{name}' is not UTF-8 ({err.reason} at byte {err.start})") from None
            return text if text.strip() else None
        try:
            vec = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"vector '{name}' cannot be read: {err}") from None
        if vec.shape != (self.dims[m],) or not np.issubdtype(vec.dtype, np.number):
            raise DataError(f"vector '{name}' holds a {vec.dtype} array of shape {vec.shape}; "
                            f"expected ({self.dims[m]},) numbers")
        return vec.astype(np.float32)  # (D,)


def class_index(label: str, index: dict[str, int], classes: list[str]) -> int:
    """A label file's text -> class index: a class name, or an integer index into ``classes``."""
    if label in index:
        return index[label]
    if label.lstrip("-").isdigit() and 0 <= int(label) < len(classes) and not _all_integers(classes):
        return int(label)
    if not label:
        raise DataError("has an empty label file")
    raise DataError(f"label '{label}' is not one of the classes ({', '.join(classes[:20])}"
                    f"{' ...' if len(classes) > 20 else ''}); list every class in data.classes")


def _all_integers(names: list[str]) -> bool:
    return all(c.lstrip("-").isdigit() for c in names)


# -- the dataset ----------------------------------------------------------------------------------
@register("datasets", "webdataset")
class WebDatasetDataset(MultimodalDataset):
    """WebDataset tar shards, streamed (DDP and workers split the shards); image/audio/video/txt/npy files.

    ``data: {name: webdataset, train: "shards/train-{000000..000003}.tar", val: ..., test: ...,
    modalities: {image: png, text: txt}, label: cls}``. A sample is the consecutive tar members
    sharing a key (``000017.png``, ``000017.txt``, ``000017.cls``); kinds by extension (png/jpg
    image, wav/flac/mp3 audio, mp4 video, txt text, npy vector); a missing file masks that modality.
    Classes: ``classes: [...]`` (a label file holds a name or an index) or the sorted labels of the
    train shards. Before training each split's shards are read once (tar headers and label files
    only) to count samples; ``size: {split: N}`` skips that. Shards are dealt to DDP ranks and
    DataLoader workers, every rank yields the same number of samples; train is shuffled by shard
    order and a ``shuffle_buffer``. No random access: train.augment and --cache-features do not apply.
    """

    Config = WebDatasetConfig

    @cached_property
    def _shards(self) -> dict[str, list[str]]:
        return {s: expand_shards(getattr(self.config, s), f"data.{s}") for s in SPLITS}

    @cached_property
    def _layout(self) -> tuple[dict[str, str], dict[str, str], dict[str, int], list[str]]:
        """``(modality -> extension, modality -> kind, vector dims, ignored extensions)`` from
        the config and the first train shard (headers, and one .npy file per vector modality)."""
        cfg = self.config
        shard = self._shards["train"][0]
        peek = scan_shards([shard], cfg.label, keep_first=lambda ext: ext_kind(ext) == "vector")
        exts = peek.exts
        if not exts:
            raise DataError(f"webdataset shard '{shard}' holds no sample (no file named <key>.<extension>)")
        if cfg.modalities is not None:
            chosen = dict(cfg.modalities)
            ignored = []
        else:
            known = [e for e in exts if e != cfg.label and ext_kind(e) is not None]
            if not known:
                raise DataError(f"webdataset shard '{shard}' has no file fusionkit reads as a modality "
                                f"(extensions: {', '.join(sorted(exts))}); see data.modalities")
            by_kind = Counter(ext_kind(e) for e in known)
            chosen = {(ext_kind(e) if by_kind[ext_kind(e)] == 1 else e.replace(".", "_")): e for e in sorted(known)}
            ignored = sorted(e for e in exts if e != cfg.label and e not in known)
        kinds = {m: ext_kind(e) for m, e in chosen.items()}
        dims = {}
        for m, ext in chosen.items():
            if kinds[m] != "vector":
                continue
            if ext not in peek.first:
                raise DataError(f"data.modalities.{m}: the first train shard '{shard}' has no '.{ext}' file "
                                f"to read the vector length from (extensions: {', '.join(sorted(exts))})")
            ident, data = peek.first[ext]
            try:
                dims[m] = int(np.load(io.BytesIO(data), allow_pickle=False).reshape(-1).shape[0])
            except (OSError, ValueError) as err:
                raise DataError(f"vector '{ident}.{ext}' cannot be read: {err}") from None
        return chosen, kinds, dims, ignored

    @property
    def default_modalities(self) -> tuple[str, ...]:
        return tuple(self._layout[0])

    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Modalities from the config (or the first train shard's extensions); no media is decoded."""
        chosen, kinds, dims, _ = self._layout
        specs = {}
        for m, ext in chosen.items():
            extra = {"sample_rate": self.config.sample_rate} if kinds[m] == "audio" else \
                {"max_frames": self.config.max_frames} if kinds[m] == "video" else {}
            specs[m] = ModalitySpec(kinds[m], dim=dims.get(m), description=f"'.{ext}' files of the webdataset shards",
                                    extra=extra)
        return specs

    def default_encoders(self) -> dict[str, dict[str, Any]]:
        """Small models that train from scratch on a CPU in minutes (override any of them)."""
        return small_default_encoders(self._layout[1])

    def load(self) -> DatasetBundle:
        cfg = self.config
        chosen, kinds, dims, ignored = self._layout
        sizes = cfg.size or {}
        # counted: every split without a size; the train shards also when the classes are unknown
        scans = {s: scan_shards(self._shards[s], cfg.label) for s in SPLITS
                 if s not in sizes or (s == "train" and cfg.classes is None)}
        if "train" in scans:
            found = ", ".join(sorted(scans["train"].exts))
            for m, ext in chosen.items():
                if not scans["train"].exts.get(ext):
                    raise DataError(f"data.modalities.{m}: no sample of the train shards has a '.{ext}' "
                                    f"file (extensions found: {found})")
        if cfg.classes is not None:
            classes = list(cfg.classes)
        else:
            names = {text for _, text in scans["train"].labels if text}
            if not names:
                raise DataError(f"data.label: no sample of the train shards has a '.{cfg.label}' file "
                                f"(extensions found: {', '.join(sorted(scans['train'].exts))})")
            classes = _sorted_labels(names)
        targets = {s: self._targets(s, scan, classes) for s, scan in scans.items()}
        splits = {}
        for s in SPLITS:
            counts = scans[s].counts if s in scans else None
            if counts is not None and sum(counts) == 0:
                raise DataError(f"data.{s}: the shards hold no sample")
            splits[s] = WebDatasetSplit(
                self._shards[s], name=s, modalities=dict(chosen), kinds=kinds, dims=dims, label=cfg.label,
                classes=classes, counts=counts, size=sizes.get(s), shuffle=s == "train",
                shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, sample_rate=cfg.sample_rate,
                max_frames=cfg.max_frames, on_bad_sample=cfg.on_bad_sample,
                targets=targets[s] if len(scans) == len(SPLITS) else None)
        lengths = {s: sum(split.counts) if split.counts is not None else split.size for s, split in splits.items()}
        modalities = ", ".join(f"{m} <- .{ext} ({kinds[m]}{f', {dims[m]}' if m in dims else ''})"
                               for m, ext in chosen.items())
        summary = (f"webdataset: {modalities}; label <- .{cfg.label} ({len(classes)} classes)"
                   + (f"; ignored extensions: {', '.join(ignored)}" if ignored else "") + "; "
                   + ", ".join(f"{s} {lengths[s]} samples{'' if s in scans else ' (data.size)'} in "
                               f"{len(self._shards[s])} shards" for s in SPLITS))
        info = {"shards": {s: len(v) for s, v in self._shards.items()}, "sizes": lengths, "summary": summary,
                "columns": dict(chosen), "ignored_columns": ignored, "task": "classification"}
        return DatasetBundle(splits, classes=classes, modalities=self.modality_specs(), info=info)

    def _targets(self, split: str, scan: ShardScan, classes: list[str]) -> list[int]:
        """Class index of every sample with a good label; a missing or unknown label stops loading
        here (error), not mid-epoch, or is left for the stream to report (skip)."""
        index = {c: k for k, c in enumerate(classes)}
        targets = []
        for ident, text in scan.labels:
            try:
                if text is None:
                    raise DataError(f"has no '.{self.config.label}' file (data.label)")
                targets.append(class_index(text, index, classes))
            except DataError as err:
                if self.config.on_bad_sample == "error":
                    shard, key = ident.rsplit(":", 1)
                    raise DataError(f"webdataset split '{split}' shard '{shard}' sample '{key}': {err}") from None
        return targets
