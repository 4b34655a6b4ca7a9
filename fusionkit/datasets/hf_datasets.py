"""Hugging Face ``datasets``: a folder written by ``save_to_disk``, a local data folder, or a hub id.

```yaml
data:
  name: hf_datasets
  path: my_data/            # save_to_disk folder (Dataset or DatasetDict); or a hub id ("user/name")
  label: label              # ClassLabel (its names are the classes), string or integer column
  modalities: {image: img, text: caption, audio: speech, feat: embedding}   # modality: column
  splits: {train: train, val: validation, test: test}                      # fusionkit: HF split
```

- ``path``: a folder ``Dataset.save_to_disk``/``DatasetDict.save_to_disk`` wrote (read with
  ``load_from_disk``), any other local folder ``load_dataset`` reads (imagefolder, audiofolder,
  csv/json/parquet files), or a hub id (``subset`` names its configuration). Hub ids download for
  users with a network; offline, only datasets already in the Hugging Face cache load.
- Columns become modalities by their feature: ``Image`` -> image (PIL), ``Audio`` -> audio
  (``float32 (C, T)`` resampled to ``sample_rate``), ``Video`` -> video (``max_frames`` frames),
  ``Value('string')`` -> text, a list of floats (``List``/``Sequence(Value('float32'))``) -> vector.
  Media are read undecoded (``decode=False``) and decoded by :mod:`fusionkit.data.media`, as for a
  manifest, so no torchcodec is needed. Without ``modalities`` every such column (but the label)
  is a modality under its own name; ``bundle.info["summary"]`` says which column became what.
- Classes: a ``ClassLabel`` column's names; otherwise the sorted labels (numeric order when all
  are integers), or ``classes: [...]``.
- Splits: by default train <- ``train`` (or the only split), val <- ``validation``/``val``/
  ``valid``/``dev``, test <- ``test``; ``splits`` maps them explicitly. A missing val or test split
  is drawn from train, stratified by class (``val_fraction``, ``test_fraction``, ``split_seed``).
- A missing value (None, an empty string) means the sample lacks that modality; a missing label
  is a bad row, and ``on_bad_sample: skip`` leaves bad rows and undecodable values out (reported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from fusionkit.datasets.base import (ClassNames, DatasetBundle, DatasetConfig, MultimodalDataset,
                                     MultimodalSplit, small_default_encoders, stratified_split)
from fusionkit.datasets.manifest import _label_name, _sorted_labels
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError
from fusionkit.lm.convert import first_line
from fusionkit.registry import register

SPLITS = ("train", "val", "test")
VAL_NAMES = ("validation", "val", "valid", "dev")  # HF split names taken as val, in this order
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "imdb", "user/name"


class HFDatasetsConfig(DatasetConfig):
    path: str = Field(..., description=(
        "a save_to_disk folder, a local data folder load_dataset reads, or a Hugging Face hub id"))
    subset: str | None = Field(None, description="the hub dataset's configuration (load_dataset's name)")
    label: str = Field("label", description="column with each row's class (ClassLabel, string or integer)")
    modalities: dict[str, str] | None = Field(None, description=(
        "modality name -> column; None = every Image/Audio/Video/string/float-list column but the label"))
    classes: ClassNames = Field(None, description=(
        "class names in index order; None = the ClassLabel's names, else the sorted labels found"))
    splits: dict[Literal["train", "val", "test"], str] | None = Field(None, description=(
        "fusionkit split -> dataset split; None = train, validation/val/valid/dev, test; "
        "a missing val or test split is drawn from train"))
    split_seed: int = Field(0, description="fixes the drawn val/test split, independent of the training seed")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class drawn for val (no val split)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class drawn for test (no test split)")
    sample_rate: int = Field(16000, ge=1, description="audio is resampled to this rate (Hz)")
    max_frames: int = Field(32, ge=1, description="video frames kept per clip, spread uniformly (bounds memory)")
    on_bad_sample: Literal["error", "skip"] = Field("error", description=(
        "error: stop at the first bad row or value; skip: leave it out and report it (skipped.json)"))

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # a local path is stored absolute (run folders work from any directory); a hub id stays as is
        return v if _is_hub_id(v) else str(Path(v).expanduser().absolute())

    @model_validator(mode="after")
    def _checks(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes has duplicate names")
        if self.splits is not None and "train" not in self.splits:
            raise ValueError("splits must name the train split (val and test may be drawn from it)")
        return self


def _is_hub_id(path: str) -> bool:
    """A hub id ("imdb", "user/name") that is not also an existing local path."""
    return bool(HUB_ID.fullmatch(path)) and not Path(path).expanduser().exists()


def _kind(feature: Any, explicit: bool = False) -> str | None:
    """Modality kind of a ``datasets`` feature, or None. Vectors: lists of floats (with
    ``explicit``, of any numbers, since the user named the column)."""
    name = type(feature).__name__
    if name in ("Image", "Audio", "Video"):
        return name.lower()
    if name == "Value" and feature.dtype in ("string", "large_string"):
        return "text"
    inner = getattr(feature, "feature", None)
    if name in ("List", "LargeList", "Sequence") and type(inner).__name__ == "Value":
        numeric = inner.dtype.startswith(("float", "int", "uint")) if explicit else inner.dtype.startswith("float")
        return "vector" if numeric else None
    return None


@dataclass
class _Source:
    """The opened dataset: its splits (media columns cast to undecoded), features and the columns' kinds."""

    splits: dict[str, Any]
    features: Any
    kinds: dict[str, str]  # modality -> kind
    columns: dict[str, str]  # modality -> column
    dims: dict[str, int]
    ignored: list[str] = field(default_factory=list)


class _Column:
    """One column of one HF split, read row by row (so a split never sits in memory)."""

    def __init__(self, ds: Any, column: str, rows: np.ndarray):
        self.ds = ds.select_columns([column])
        self.column = column
        self.rows = rows  # positions in the HF split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.ds[int(self.rows[i])][self.column]


class HFSplit(MultimodalSplit):
    """A split whose columns read a Hugging Face dataset lazily; media are decoded on access (in
    DataLoader workers) by :mod:`fusionkit.data.media`. ``ids`` are row numbers in the HF split.

    ``present[m]`` marks the rows that have modality ``m`` (None or empty text = missing), so
    missing values are never read.
    """

    def __init__(self, columns: dict[str, _Column], present: dict[str, np.ndarray], targets: list[int],
                 ids: list[int], *, kinds: dict[str, str], dims: dict[str, int], where: str, name: str,
                 sample_rate: int, max_frames: int, on_bad_sample: str, dropped: list[dict[str, Any]] | None = None):
        super().__init__(columns, targets, ids)
        self.present = present
        self.kinds = kinds
        self.dims = dims
        self.where = where  # "hf_datasets 'path' split 'train'"
        self.name = name
        self.sample_rate = sample_rate
        self.max_frames = max_frames
        self.on_bad_sample = on_bad_sample
        self.dropped = dropped or []

    def describe(self, i: int) -> str:
        return f"{self.where} row {self.ids[i]}"

    def decode(self, m: str, value: Any, i: int) -> Any:
        """A stored value -> the raw value encoders take."""
        from fusionkit.data import media

        kind = self.kinds[m]
        if kind == "text":
            return value if value.strip() else None
        if kind == "vector":
            vec = np.asarray(value, dtype=np.float32)  # (D,)
            if vec.shape != (self.dims[m],) or not np.isfinite(vec).all():
                raise DataError(f"vector of shape {vec.shape} (expected ({self.dims[m]},)) or with "
                                f"non-finite entries")
            return vec
        data, path = value.get("bytes"), value.get("path")
        if data is None and path is None:
            return None
        name = f"row {self.ids[i]}" + (f", {Path(path).name}" if path else "")  # its suffix picks the audio reader
        if kind == "image":
            return media.decode_image(data, name) if data is not None else media.load_image(path)
        if kind == "audio":
            return media.decode_audio(data, name, self.sample_rate) if data is not None \
                else media.load_audio(path, self.sample_rate)  # (C, T) float32
        frames = media.decode_video(data, name, self.max_frames) if data is not None \
            else media.load_video(path, self.max_frames)
        return frames[0]  # (F, H, W, 3) uint8

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {}
        for m, values in self.columns.items():
            try:
                inputs[m] = self.decode(m, values[i], i) if values[i] is not None else None
            except DataError as err:
                if self.on_bad_sample == "skip":
                    return {"skip": f"column '{values.column}': {err}", "id": self.ids[i], "inputs": {},
                            "target": self.targets[i], "index": i}
                raise DataError(f"{self.describe(i)}, column '{values.column}': {err}") from None
        return {"inputs": inputs, "target": self.targets[i], "index": i}

    def select(self, modalities: list[str]) -> "HFSplit":
        """The same rows restricted to ``modalities``; rows with none of them are left out and
        recorded in ``dropped``."""
        has_any = np.zeros(len(self), dtype=bool)
        for m in modalities:
            has_any |= self.present[m]
        keep = np.flatnonzero(has_any)
        dropped = [{"split": self.name, "id": self.ids[i], "stage": "select",
                    "reason": f"none of the chosen modalities {sorted(modalities)} is present"}
                   for i in np.flatnonzero(~has_any)]
        columns = {m: _Column(self.columns[m].ds, self.columns[m].column, self.columns[m].rows[keep])
                   for m in modalities}
        return HFSplit(columns, {m: self.present[m][keep] for m in modalities},
                       [self.targets[i] for i in keep], [self.ids[i] for i in keep],
                       kinds={m: self.kinds[m] for m in modalities}, dims=self.dims, where=self.where,
                       name=self.name, sample_rate=self.sample_rate, max_frames=self.max_frames,
                       on_bad_sample=self.on_bad_sample, dropped=self.dropped + dropped)


@register("datasets", "hf_datasets")
class HFDatasetsDataset(MultimodalDataset):
    """Hugging Face datasets: a save_to_disk folder or a hub id; Image/Audio/Video/string/float-list columns.

    ``data: {name: hf_datasets, path: my_data/, label: label, modalities: {image: img, text: caption}}``.
    ``path`` is a folder ``save_to_disk`` wrote, a local data folder (imagefolder, csv, parquet ...)
    or a hub id (downloads need a network; offline only cached datasets load). Columns become
    modalities by feature: Image -> image, Audio -> audio (resampled to ``sample_rate``), Video ->
    video, string -> text, list of floats -> vector; without ``modalities`` every such column but the
    label is one, under its own name. Classes come from a ClassLabel label (else sorted labels or
    ``classes``). Splits: train, validation/val/valid/dev, test (or ``splits: {train: .., val: ..,
    test: ..}``); a missing val or test split is drawn from train, stratified (``val_fraction``,
    ``test_fraction``, ``split_seed``). Media are decoded on access, in DataLoader workers; a
    missing value masks that modality; ``on_bad_sample: skip`` leaves bad rows out and reports them.
    """

    Config = HFDatasetsConfig

    @property
    def what(self) -> str:
        return f"hf_datasets '{self.config.path}'"

    # -- opening ------------------------------------------------------------------------------
    def _open(self) -> dict[str, Any]:
        """The dataset's splits by name (a plain Dataset is one split called ``train``)."""
        import datasets
        from datasets.exceptions import DatasetsError

        datasets.disable_progress_bars()  # our own progress display is the only one
        cfg = self.config
        path = Path(cfg.path)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(path))
            elif path.is_dir():
                loaded = datasets.load_dataset(str(path), cfg.subset)
            elif path.exists():
                raise DataError(f"{self.what} is a file; give the folder save_to_disk wrote (or a hub id)")
            elif not _is_hub_id(cfg.path):
                raise DataError(f"{self.what}: the folder does not exist")
            else:
                loaded = datasets.load_dataset(cfg.path, cfg.subset)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, DatasetsError) as err:
            raise DataError(self._load_failure(err)) from None
        if isinstance(loaded, datasets.Dataset):
            return {"train": loaded}
        return dict(loaded)

    def _load_failure(self, err: BaseException) -> str:
        """One line: why the dataset did not load and what to do (as the LM loader says it)."""
        import datasets

        if not _is_hub_id(self.config.path):
            return (f"{self.what} cannot be read ({first_line(err)}); give a folder save_to_disk wrote "
                    f"or one load_dataset reads (imagefolder, csv, json, parquet files)")
        if datasets.config.HF_HUB_OFFLINE and isinstance(err, OSError):
            return (f"dataset '{self.config.path}' cannot be loaded offline: not a local folder and not "
                    f"in the Hugging Face cache; download it once with network access or pass a folder "
                    f"written by save_to_disk")
        return (f"dataset '{self.config.path}' cannot be loaded from the Hugging Face hub "
                f"({first_line(err)}); check the id, or pass a folder written by save_to_disk")

    @cached_property
    def _source(self) -> _Source:
        cfg = self.config
        splits = self._open()
        first = splits[self._split_names(splits)["train"]]
        features = first.features
        names = list(features)
        if cfg.label not in features:
            raise DataError(f"{self.what}: no label column '{cfg.label}' (data.label); "
                            f"columns are {', '.join(names)}")
        ignored: list[str] = []
        if cfg.modalities is not None:
            columns = dict(cfg.modalities)
            kinds = {}
            for m, col in columns.items():
                if col not in features:
                    raise DataError(f"{self.what}: data.modalities.{m} names column '{col}', which the "
                                    f"dataset does not have (columns: {', '.join(names)})")
                if col == cfg.label:
                    raise DataError(f"data.modalities.{m}: '{col}' is the label column (data.label)")
                kinds[m] = _kind(features[col], explicit=True)
                if kinds[m] is None:
                    raise DataError(f"{self.what}: column '{col}' is {features[col]}; a modality column holds "
                                    f"Image, Audio, Video, strings or lists of numbers")
        else:
            columns, kinds = {}, {}
            for col in (c for c in names if c != cfg.label):
                kind = _kind(features[col])
                if kind is None:
                    ignored.append(col)
                else:
                    columns[col], kinds[col] = col, kind
            if not columns:
                raise DataError(f"{self.what} has no column fusionkit reads as a modality (Image, Audio, Video, "
                                f"string, list of floats); columns are "
                                + ", ".join(f"{c} ({features[c]})" for c in names))
        dims = {m: self._vector_dim(first, columns[m]) for m, k in kinds.items() if k == "vector"}
        return _Source(splits, features, kinds, columns, dims, ignored)

    def _vector_dim(self, ds: Any, col: str) -> int:
        """A fixed-length list's length, else the length of the column's first value."""
        length = getattr(ds.features[col], "length", -1)
        if length and length > 0:
            return int(length)
        for value in ds.select_columns([col]).with_format(None):
            if value[col]:
                return len(value[col])
        raise DataError(f"{self.what}: vector column '{col}' has no value in the train split")

    def _split_names(self, splits: dict[str, Any]) -> dict[str, str]:
        """fusionkit split -> HF split, for the splits the dataset has (val/test may be absent)."""
        cfg = self.config
        have = ", ".join(splits)
        if cfg.splits is not None:
            for ours, theirs in cfg.splits.items():
                if theirs not in splits:
                    raise DataError(f"data.splits.{ours}: {self.what} has no split '{theirs}' (splits: {have})")
            return dict(cfg.splits)
        if "train" in splits:
            names = {"train": "train"}
        elif len(splits) == 1:
            names = {"train": next(iter(splits))}
        else:
            raise DataError(f"{self.what} has no 'train' split (splits: {have}); map them with "
                            f"data.splits: {{train: ..., val: ..., test: ...}}")
        val = next((s for s in VAL_NAMES if s in splits), None)
        if val is not None:
            names["val"] = val
        if "test" in splits and names["train"] != "test":
            names["test"] = "test"
        return names

    # -- dataset API --------------------------------------------------------------------------
    @property
    def default_modalities(self) -> tuple[str, ...]:
        return tuple(self._source.kinds)

    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Modalities and their kinds from the dataset's features (no media is decoded)."""
        src = self._source
        specs = {}
        for m, kind in src.kinds.items():
            text = f"column '{src.columns[m]}' of {self.what}"
            extra = {"sample_rate": self.config.sample_rate} if kind == "audio" else \
                {"max_frames": self.config.max_frames} if kind == "video" else {}
            specs[m] = ModalitySpec(kind, dim=src.dims.get(m), description=text, extra=extra)
        return specs

    def default_encoders(self) -> dict[str, dict[str, Any]]:
        """Small models that train from scratch on a CPU in minutes (override any of them)."""
        return small_default_encoders(self._source.kinds)

    def load(self) -> DatasetBundle:
        cfg, src = self.config, self._source
        names = self._split_names(src.splits)  # fusionkit split -> HF split
        label_feature = src.features[cfg.label]
        class_label = label_feature if type(label_feature).__name__ == "ClassLabel" else None
        skipped: list[dict[str, Any]] = []
        opened = {theirs: self._undecoded(src.splits[theirs]) for theirs in dict.fromkeys(names.values())}
        labels = {theirs: self._labels(ds, theirs, class_label, skipped) for theirs, ds in opened.items()}
        if cfg.classes is not None:
            classes = list(cfg.classes)
        elif class_label is not None:
            classes = list(class_label.names)
        else:
            classes = _sorted_labels({v for lab in labels.values() for v in lab if v is not None})
        index = {c: k for k, c in enumerate(classes)}
        picked: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}  # fusionkit split -> (HF split, rows, targets)
        for ours, theirs in names.items():
            lab = labels[theirs]
            for row, v in enumerate(lab):
                if v is not None and v not in index:
                    self._bad(f"{self.what} split '{theirs}' row {row}",
                              f"label '{v}' is not one of data.classes ({', '.join(classes)})", theirs, row, skipped)
                    lab[row] = None
            rows = np.array([r for r, v in enumerate(lab) if v is not None], dtype=np.int64)
            picked[ours] = (theirs, rows, np.array([index[lab[r]] for r in rows], dtype=np.int64))
        drawn = [s for s in ("val", "test") if s not in picked]
        if drawn:  # from train, stratified by class
            theirs, rows, targets = picked["train"]
            assign = stratified_split(targets, cfg.val_fraction if "val" in drawn else 0.0,
                                      cfg.test_fraction if "test" in drawn else 0.0, cfg.split_seed)
            for name in ("train", *drawn):
                picked[name] = (theirs, rows[assign == name], targets[assign == name])
        splits = {}
        for name in SPLITS:
            theirs, rows, targets = picked[name]
            if len(rows) == 0:
                how = f"the drawn split left it empty; add rows or raise data.{name}_fraction" if name in drawn \
                    else "it has no usable row"
                raise DataError(f"{self.what}: the '{name}' split is empty ({how})")
            ds = opened[theirs]
            splits[name] = HFSplit(
                {m: _Column(ds, src.columns[m], rows) for m in src.kinds}, self._present(ds, rows), targets.tolist(),
                rows.tolist(), kinds=dict(src.kinds), dims=src.dims,
                where=f"{self.what} split '{theirs}'", name=name, sample_rate=cfg.sample_rate,
                max_frames=cfg.max_frames, on_bad_sample=cfg.on_bad_sample)
        info = {"source": cfg.path, "columns": dict(src.columns), "sizes": {k: len(v) for k, v in splits.items()},
                "summary": self._summary(classes, class_label is not None, splits, drawn), "skipped": skipped,
                "ignored_columns": src.ignored, "split": {s: picked[s][0] for s in SPLITS}, "task": "classification"}
        return DatasetBundle(splits, classes=classes, modalities=self.modality_specs(), info=info)

    def _undecoded(self, ds: Any) -> Any:
        """``ds`` with its media columns cast to ``decode=False``: fusionkit.data.media decodes the bytes."""
        import datasets

        for m, kind in self._source.kinds.items():
            col = self._source.columns[m]
            if kind in ("image", "audio", "video") and getattr(ds.features[col], "decode", False):
                ds = ds.cast_column(col, getattr(datasets, kind.capitalize())(decode=False))
        return ds

    def _summary(self, classes: list[str], class_label: bool, splits: dict[str, HFSplit], drawn: list[str]) -> str:
        """One line: which column became which modality, the label, the split sizes."""
        src, cfg = self._source, self.config
        kinds = [f"{m} <- column '{src.columns[m]}' ({k}{f', {src.dims[m]}' if m in src.dims else ''})"
                 for m, k in src.kinds.items()]
        return (f"{self.what}: {', '.join(kinds)}; label <- column '{cfg.label}' "
                f"({'ClassLabel, ' if class_label else ''}{len(classes)} classes)"
                + (f"; ignored columns: {', '.join(src.ignored)}" if src.ignored else "")
                + f"; splits {', '.join(f'{s} {len(splits[s])}' for s in SPLITS)}"
                + (f" ({' and '.join(drawn)} drawn from train, seed {cfg.split_seed})" if drawn else ""))

    # -- per-row checks -----------------------------------------------------------------------
    def _bad(self, where: str, reason: str, split: str, row: int, skipped: list[dict[str, Any]]) -> None:
        if self.config.on_bad_sample == "error":
            raise DataError(f"{where} {reason}")
        skipped.append({"split": split, "id": row, "stage": "load", "reason": reason})

    def _labels(self, ds: Any, theirs: str, class_label: Any, skipped: list[dict[str, Any]]) -> list[str | None]:
        """Every row's label name (None for a bad row, recorded or raised)."""
        col = self.config.label
        out: list[str | None] = []
        for row, v in enumerate(ds.select_columns([col]).with_format("arrow")[col].to_pylist()):
            if class_label is not None and isinstance(v, int):
                v = class_label.names[v] if 0 <= v < class_label.num_classes else None  # -1: no label
            if v is None or (isinstance(v, str) and not v.strip()) or isinstance(v, (list, dict)):
                reason = f"label must be a name or a number, got {v!r:.60}" if isinstance(v, (list, dict)) \
                    else f"has no label (column '{col}')"
                self._bad(f"{self.what} split '{theirs}' row {row}", reason, theirs, row, skipped)
                out.append(None)
                continue
            out.append(_label_name(v))
        return out

    def _present(self, ds: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Per modality, which of ``rows`` hold a value (null and empty text are missing)."""
        import pyarrow.compute as pc

        src = self._source
        present = {}
        for m, kind in src.kinds.items():
            col = src.columns[m]
            arr = ds.select_columns([col]).with_format("arrow")[col]
            ok = pc.is_valid(arr)
            if kind == "text":
                ok = pc.and_(ok, pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(arr), ""), False))
            elif kind == "vector":
                ok = pc.and_(ok, pc.fill_null(pc.greater(pc.list_value_length(arr), 0), False))
            present[m] = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)[rows]
        return present
