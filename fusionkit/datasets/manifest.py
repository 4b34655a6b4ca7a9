"""Your own files: a JSONL or CSV manifest with one sample per line.

Each row names a label, optionally a split, and one value per modality column::

    {"image": "img/001.png", "text": "a red car", "audio": "wav/001.wav", "label": "car", "split": "train"}

- Paths are relative to the manifest's folder (absolute paths work too).
- Column kinds come from ``modalities`` or are inferred from the values: an image, audio or
  video file extension, a ``.npy`` path or a list of numbers (vector), any other string (text).
  Columns holding only single numbers (ids, scores) are not modalities and are ignored.
- A missing key, ``null`` or empty string means the sample lacks that modality.
- Media stay paths until a sample is read: :class:`ManifestSplit` decodes them on access, in
  DataLoader workers, so a large dataset never sits in memory.

Checked when loading (errors name the manifest line and the file): unparsable lines, missing or
unknown labels, bad split values, missing files, vectors of the wrong length or not numeric,
rows with no modality. A file that exists but cannot be decoded is found when it is read.
With ``on_bad_sample: skip`` such rows are left out and reported (the trainer writes
``skipped.json`` in the run folder); nothing is dropped silently.

With ``task: vqa`` a row holds a question and its reference answers instead of a label::

    {"image": "img/001.png", "question": "what color is the car?", "answers": ["red", "dark red"], "type": "color"}

- ``question`` (data.question) is a text modality that keeps its column name; the bundle names
  it in ``info["question_modality"]``. Rows whose question is missing or empty are bad rows.
- ``answers`` (data.answers): a JSON list of strings or one string; in a CSV cell, answers
  separated by ``|`` (``red|dark red``). A row with no answer is a bad row.
- ``data.question_type`` optionally names a column with each question's type (for per-type
  accuracy). Targets are ``{"answers": [...], "type": type or None}`` and ``classes`` is empty.
- A drawn split (no split column) keeps every row with the same inputs other than the question
  (e.g. the same image) in one split, so no image is asked about in both train and test; the
  fractions then count those groups, not rows.

With ``task: captioning`` a row holds its inputs and one or more reference captions::

    {"image": "img/001.png", "caption": ["a red car on a street", "a small red car"]}

- ``caption`` (data.caption): a JSON list of strings or one string; in a CSV cell, captions
  separated by ``|``. A row with no caption, or with an empty one, is a bad row.
- Targets are ``{"captions": [...]}`` and ``classes`` is empty; a drawn split keeps rows with the
  same inputs (the same image captioned on several rows) in one split, as for vqa.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from fusionkit.datasets.base import (ClassNames, DatasetBundle, DatasetConfig, MultimodalDataset,
                                     MultimodalSplit, pretrained_default_encoders)
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError
from fusionkit.registry import register

Kind = Literal["image", "text", "audio", "video", "vector"]
MEDIA_KINDS = ("image", "audio", "video")
SPLITS = ("train", "val", "test")
EXTENSIONS: dict[str, str] = {
    **{s: "image" for s in (".png", ".jpg", ".jpeg", ".bmp", ".webp")},
    **{s: "audio" for s in (".wav", ".flac", ".ogg", ".mp3", ".m4a")},
    **{s: "video" for s in (".mp4", ".avi", ".mov", ".mkv", ".webm")},
    ".npy": "vector",
}


class ManifestConfig(DatasetConfig):
    path: str = Field(..., description="the manifest: .jsonl (one JSON object per line) or .csv/.tsv with a header")
    modalities: dict[str, Kind] | None = Field(None, description=(
        "column -> kind (image/text/audio/video/vector); None = infer from the values"))
    label_column: str = Field("label", description="column holding each row's class")
    classes: ClassNames = Field(None, description=(
        "class names in index order; None = the sorted labels found (numeric order if all are integers)"))
    split_column: str | None = Field("split", description=(
        "column with train/val/test; when the manifest has no such column (or None), a stratified "
        "split fixed by split_seed is drawn"))
    split_seed: int = Field(0, description="fixes the drawn split, independent of the training seed")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class for validation (drawn split)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class for test (drawn split)")
    sample_rate: int = Field(16000, ge=1, description="audio is resampled to this rate (Hz)")
    max_frames: int = Field(32, ge=1, description="video frames kept per clip, spread uniformly (bounds memory)")
    on_bad_sample: Literal["error", "skip"] = Field("error", description=(
        "error: stop at the first bad row or file; skip: leave it out and report it (skipped.json)"))
    task: Literal["classification", "vqa", "captioning"] = Field("classification", description=(
        "classification: one label per row (label_column); vqa: a question and its answers per row; "
        "captioning: reference captions per row"))
    question: str = Field("question", description=(
        "vqa: column with the question text; a text modality under this column's name"))
    answers: str = Field("answers", description=(
        "vqa: column with the reference answers: a JSON list or one string; in CSV, '|'-separated"))
    question_type: str | None = Field(None, description=(
        "vqa: optional column with each question's type (e.g. yes/no), for per-type accuracy"))
    caption: str = Field("caption", description=(
        "captioning: column with the reference captions: a JSON list or one string; in CSV, '|'-separated"))

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # stored absolute, so a run folder's config.yaml keeps working from any directory
        return str(Path(v).expanduser().absolute())

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes has duplicate names")
        if self.task != "classification" and self.classes is not None:
            raise ValueError(f"classes is for task classification; a {self.task} manifest has no classes")
        columns = [c for c in (self.question, self.answers, self.question_type) if c is not None]
        if self.task == "vqa" and len(set(columns)) != len(columns):
            raise ValueError("question, answers and question_type must name different columns")
        return self


class _BadRow(Exception):
    """A row-level problem; becomes a DataError (error) or a skipped-row record (skip)."""


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _value_kind(v: Any) -> str:
    """Kind a single non-missing value suggests: a modality kind, or ``scalar``/``other``."""
    if _is_number(v) or isinstance(v, bool):
        return "scalar"
    if isinstance(v, list):
        return "vector"
    if not isinstance(v, str):
        return "other"
    s = v.strip()
    suffix = PurePath(s).suffix.lower() if "\n" not in s else ""
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if s.startswith("[") and s.endswith("]"):  # an inline vector in a CSV cell
        try:
            return "vector" if isinstance(json.loads(s), list) else "text"
        except ValueError:
            return "text"
    return "scalar" if _looks_numeric(s) else "text"


def _label_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON 3.0 and 3 name the same class
    return str(v).strip()


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric order when every label is an integer (so "10" follows "9"), else string order."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


@dataclass
class _Scan:
    """The manifest read once: parsed rows, per-row parse problems, column kinds, vector dims."""

    rows: list[tuple[int, dict[str, Any]]]
    problems: list[tuple[int, str]]
    kinds: dict[str, str]
    dims: dict[str, int]
    ignored: list[str] = field(default_factory=list)


class ManifestSplit(MultimodalSplit):
    """A split whose media columns hold paths, decoded by :mod:`fusionkit.data.media` on access.

    ``ids`` are manifest line numbers. With ``on_bad_sample == "skip"`` a file that cannot be
    decoded yields ``{"skip": reason, "id": line, ...}`` instead of raising; the loader's
    ``Collate`` leaves such items out of the batch and reports them in ``batch["skipped"]``.
    """

    def __init__(self, columns: dict[str, list[Any]], targets: list[Any], ids: list[int], *,
                 kinds: dict[str, str], manifest: str, name: str, sample_rate: int, max_frames: int,
                 on_bad_sample: str, dropped: list[dict[str, Any]] | None = None):
        super().__init__(columns, targets, ids)
        self.kinds = kinds
        self.manifest = manifest
        self.name = name
        self.sample_rate = sample_rate
        self.max_frames = max_frames
        self.on_bad_sample = on_bad_sample
        self.dropped = dropped or []  # rows left out by select(): none of the chosen modalities

    def describe(self, i: int) -> str:
        """Where sample ``i`` comes from, for error messages."""
        return f"manifest '{self.manifest}' line {self.ids[i]}"

    def decode(self, kind: str, value: Any) -> Any:
        """One stored value -> the raw value encoders take (see the module docstring)."""
        from fusionkit.data import media

        if kind == "image":
            return media.load_image(value)
        if kind == "audio":
            return media.load_audio(value, self.sample_rate)  # (C, T) float32
        if kind == "video":
            return media.load_video(value, self.max_frames)[0]  # (F, H, W, 3) uint8
        if kind == "vector" and isinstance(value, str):
            return _load_npy(value).astype(np.float32)  # (D,)
        return value  # text: str; inline vector: float32 (D,) already

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {}
        for m, values in self.columns.items():
            try:
                inputs[m] = None if values[i] is None else self.decode(self.kinds[m], values[i])
            except DataError as err:
                if self.on_bad_sample == "skip":
                    return {"skip": f"column '{m}': {err}", "id": self.ids[i], "inputs": {},
                            "target": self.targets[i], "index": i}
                raise DataError(f"{self.describe(i)}, column '{m}': {err}") from None
        return {"inputs": inputs, "target": self.targets[i], "index": i}

    def select(self, modalities: list[str]) -> "ManifestSplit":
        """The same rows restricted to ``modalities``; rows with none of them are left out and
        recorded in ``dropped`` (they are fine rows, just unusable for this choice)."""
        keep = [i for i in range(len(self)) if any(self.columns[m][i] is not None for m in modalities)]
        kept = set(keep)
        dropped = [{"split": self.name, "id": self.ids[i], "stage": "select",
                    "reason": f"none of the chosen modalities {sorted(modalities)} is present"}
                   for i in range(len(self)) if i not in kept]
        return ManifestSplit({m: [self.columns[m][i] for i in keep] for m in modalities},
                             [self.targets[i] for i in keep], [self.ids[i] for i in keep],
                             kinds={m: self.kinds[m] for m in modalities}, manifest=self.manifest,
                             name=self.name, sample_rate=self.sample_rate, max_frames=self.max_frames,
                             on_bad_sample=self.on_bad_sample, dropped=self.dropped + dropped)


def _load_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"vector file '{path}' cannot be read: {err}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"vector file '{path}' holds a {arr.dtype} array of shape {arr.shape}; "
                        f"expected one numeric row (D,)")
    return np.asarray(arr)


@register("datasets", "manifest")
class ManifestDataset(MultimodalDataset):
    """Your files: a JSONL/CSV manifest of image/text/audio/video/vector columns and a label."""

    Config = ManifestConfig

    # -- reading the manifest -------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return Path(self.config.path)

    def _where(self, line: int) -> str:
        return f"manifest '{self.manifest}' line {line}"

    def _raw_rows(self) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
        """``(line, row)`` for every parsable row and ``(line, reason)`` for the others."""
        path = self.manifest
        if path.is_dir():
            raise DataError(f"manifest '{path}' is a folder; give the manifest file inside it "
                            f"(e.g. {path / 'manifest.jsonl'})")
        if not path.is_file():
            raise DataError(f"manifest file '{path}' does not exist")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".tsv"):
            raise DataError(f"manifest '{path}': unknown format '{suffix}'; use .jsonl (one JSON object "
                            f"per line) or .csv/.tsv with a header row")
        rows, problems = [], []
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                if suffix in (".csv", ".tsv"):
                    reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
                    header = next(reader, None)
                    if not header or not any(h.strip() for h in header):
                        raise DataError(f"manifest '{path}' is empty; the first line must name the columns")
                    header = [h.strip() for h in header]
                    for cells in reader:
                        line = reader.line_num
                        if not cells or not any(c.strip() for c in cells):
                            continue  # blank line
                        if len(cells) != len(header):
                            problems.append((line, f"has {len(cells)} fields, the header has {len(header)}"))
                            continue
                        rows.append((line, dict(zip(header, cells))))
                else:
                    for line, text in enumerate(f, 1):
                        if not text.strip():
                            continue
                        try:
                            row = json.loads(text)
                        except ValueError as err:
                            problems.append((line, f"is not valid JSON ({err})"))
                            continue
                        if not isinstance(row, dict):
                            problems.append((line, f"must be a JSON object, got {type(row).__name__}"))
                            continue
                        rows.append((line, row))
        except UnicodeDecodeError as err:
            raise DataError(f"manifest '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except csv.Error as err:
            raise DataError(f"manifest '{path}': unparsable CSV ({err})") from None
        if not rows and not problems:
            what = "has a header row but no sample rows" if suffix in (".csv", ".tsv") else "is empty (no rows)"
            raise DataError(f"manifest '{path}' {what}; add one row per sample")
        return rows, problems

    def _reserved(self) -> set[str | None]:
        """Columns that are never modalities: the split and the task's target columns."""
        cfg = self.config
        if cfg.task == "vqa":
            return {cfg.split_column, cfg.answers, cfg.question_type}
        if cfg.task == "captioning":
            return {cfg.split_column, cfg.caption}
        return {cfg.label_column, cfg.split_column}

    def _infer_kinds(self, rows: list[tuple[int, dict[str, Any]]]) -> tuple[dict[str, str], list[str]]:
        """Column -> kind from the values; columns of plain numbers (ids, scores) are ignored."""
        reserved = self._reserved()
        question = self.config.question if self.config.task == "vqa" else None
        seen: dict[str, dict[str, int]] = {}  # column -> kind -> first line with it
        order: list[str] = []
        for line, row in rows:
            for col, v in row.items():
                if col in reserved:
                    continue
                if col not in seen:
                    seen[col] = {}
                    order.append(col)
                if not _missing(v):
                    seen[col].setdefault(_value_kind(v), line)
        kinds, ignored = {}, []
        for col in order:
            if col == question:
                kinds[col] = "text"  # even "what is in 1.png" or "5" is a question
                continue
            found = dict(seen[col])
            if "text" in found and "scalar" in found:
                found.pop("scalar")  # a caption that happens to be "5" is still a caption
            if not found or set(found) == {"scalar"}:
                ignored.append(col)
                continue
            if "other" in found:
                raise DataError(f"{self._where(found['other'])}: column '{col}' holds a JSON object; "
                                f"values must be strings, paths or lists of numbers")
            if len(found) > 1:
                (k1, l1), (k2, l2) = sorted(found.items(), key=lambda kv: kv[1])[:2]
                raise DataError(f"manifest '{self.manifest}': column '{col}' mixes {k1} (line {l1}) and "
                                f"{k2} (line {l2}) values; declare its kind in data.modalities")
            kinds[col] = next(iter(found))
        return kinds, ignored

    @cached_property
    def _scan(self) -> _Scan:
        rows, problems = self._raw_rows()
        if problems and self.config.on_bad_sample == "error":
            line, reason = problems[0]
            raise DataError(f"{self._where(line)} {reason}")
        ignored: list[str] = []
        present = {col for _, row in rows for col in row}
        if self.config.task == "vqa":
            self._check_vqa_columns(present)
        if self.config.task == "captioning" and self.config.caption not in present:
            raise DataError(f"manifest '{self.manifest}': no column '{self.config.caption}' (data.caption); "
                            f"columns are {', '.join(sorted(present)) or 'none'}")
        if self.config.modalities is not None:
            kinds = dict(self.config.modalities)
            if self.config.task == "vqa":
                question = self.config.question
                if kinds.setdefault(question, "text") != "text":
                    raise DataError(f"data.modalities declares the question column '{question}' as "
                                    f"{kinds[question]}; it must be text (or leave it out)")
            for col in kinds:
                if col not in present:
                    raise DataError(f"data.modalities names column '{col}', which no row of "
                                    f"'{self.manifest}' has (columns: {', '.join(sorted(present))})")
        else:
            kinds, ignored = self._infer_kinds(rows)
        if not kinds:
            raise DataError(f"manifest '{self.manifest}' has no modality column (found only "
                            f"{sorted({c for _, r in rows for c in r})}); see data.modalities")
        dims = {}
        for col in (c for c, k in kinds.items() if k == "vector"):
            for _, row in rows:  # the first present value that parses fixes the length
                if _missing(row.get(col)):
                    continue
                try:
                    vec = self._vector(row.get(col), None)  # float32 (D,), or a checked .npy path
                except _BadRow:
                    continue
                dims[col] = len(vec) if isinstance(vec, np.ndarray) else _load_npy(vec).shape[0]
                break
            if not dims.get(col):
                raise DataError(f"manifest '{self.manifest}': vector column '{col}' has no readable value")
        return _Scan(rows, problems, kinds, dims, ignored)

    def _check_vqa_columns(self, present: set[str]) -> None:
        cfg = self.config
        for key in ("question", "answers", "question_type"):
            col = getattr(cfg, key)
            if col is not None and col not in present:
                raise DataError(f"manifest '{self.manifest}': no column '{col}' (data.{key}); "
                                f"columns are {', '.join(sorted(present)) or 'none'}")

    # -- one value ------------------------------------------------------------------------
    def _file(self, value: Any, kind: str) -> str:
        if not isinstance(value, str):
            raise _BadRow(f"{kind} value must be a file path, got {value!r}")
        path = Path(value.strip()).expanduser()
        full = path if path.is_absolute() else self.manifest.parent / path
        if not full.is_file():
            raise _BadRow(f"{kind} file '{value}' does not exist (looked for {full})")
        return str(full)

    def _vector(self, value: Any, dim: int | None) -> np.ndarray | str:
        """An inline list (or its JSON text in a CSV cell) -> float32 (D,); a .npy path stays a path."""
        if isinstance(value, str) and value.strip().lower().endswith(".npy"):
            full = self._file(value, "vector")
            try:
                shape = _load_npy(full).shape
            except DataError as err:
                raise _BadRow(str(err)) from None
            if dim is not None and shape != (dim,):
                raise _BadRow(f"vector file '{value}' has shape {shape}, expected ({dim},)")
            return full
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise _BadRow(f"vector value {value[:40]!r} is neither a list of numbers nor a .npy path") from None
        if not isinstance(value, list) or not value:
            raise _BadRow(f"vector value must be a non-empty list of numbers or a .npy path, got {value!r:.60}")
        bad = next((x for x in value if not _is_number(x) or not math.isfinite(x)), None)
        if bad is not None:
            raise _BadRow(f"vector holds a non-numeric or non-finite entry {bad!r}")
        if dim is not None and len(value) != dim:
            raise _BadRow(f"vector has length {len(value)}, expected {dim} (the length of the first vector)")
        return np.asarray(value, dtype=np.float32)

    def _answers(self, value: Any) -> list[str]:
        """The answers cell -> non-empty list of answer strings; raises _BadRow."""
        col = self.config.answers
        if _missing(value):
            raise _BadRow(f"has no answer (column '{col}')")
        if isinstance(value, str) and self.manifest.suffix.lower() in (".csv", ".tsv"):
            value = value.split("|")
        elif isinstance(value, str) or _is_number(value):
            value = [value]
        if not isinstance(value, list):
            raise _BadRow(f"answers (column '{col}') must be a list of strings or a string, got {value!r:.60}")
        bad = next((a for a in value if not (isinstance(a, str) or _is_number(a))), None)
        if bad is not None:
            raise _BadRow(f"answers (column '{col}') must be strings, got {bad!r:.60}")
        answers = [_label_name(a) for a in value if not _missing(a)]  # JSON 2 and 2.0 both read "2"
        if not answers:
            raise _BadRow(f"has no answer (column '{col}')")
        return answers

    def _captions(self, value: Any) -> list[str]:
        """The caption cell -> non-empty list of non-empty captions; raises _BadRow."""
        col = self.config.caption
        if _missing(value) or value == []:
            raise _BadRow(f"has no caption (column '{col}')")
        if isinstance(value, str):
            value = value.split("|") if self.manifest.suffix.lower() in (".csv", ".tsv") else [value]
        if not isinstance(value, list):
            raise _BadRow(f"captions (column '{col}') must be a string or a list of strings, got {value!r:.60}")
        for k, c in enumerate(value, 1):
            if not isinstance(c, str):
                raise _BadRow(f"captions (column '{col}') must be strings, got {c!r:.60}")
            if not c.strip():
                raise _BadRow(f"has an empty caption (column '{col}', caption {k} of {len(value)})")
        return [c.strip() for c in value]

    def _target(self, row: dict[str, Any]) -> Any:
        """The row's target: a label name (classification), ``{"answers", "type"}`` (vqa) or
        ``{"captions"}`` (captioning)."""
        cfg = self.config
        if cfg.task == "captioning":
            return {"captions": self._captions(row.get(cfg.caption))}
        if cfg.task == "vqa":
            question = row.get(cfg.question)
            if _missing(question):
                raise _BadRow(f"has no question (column '{cfg.question}')")
            kind = row.get(cfg.question_type) if cfg.question_type else None
            if isinstance(kind, (list, dict)):
                raise _BadRow(f"question type (column '{cfg.question_type}') must be a name, got {kind!r:.60}")
            return {"answers": self._answers(row.get(cfg.answers)),
                    "type": None if _missing(kind) else _label_name(kind)}
        label = row.get(cfg.label_column)
        if _missing(label):
            raise _BadRow(f"has no label (column '{cfg.label_column}')")
        if isinstance(label, (list, dict)):
            raise _BadRow(f"label must be a name or a number, got {label!r:.60}")
        label = _label_name(label)
        if cfg.classes is not None and label not in cfg.classes:
            raise _BadRow(f"label '{label}' is not one of data.classes ({', '.join(cfg.classes)})")
        return label

    def _check_row(self, row: dict[str, Any], scan: _Scan, has_split: bool) -> tuple[dict[str, Any], Any, str | None]:
        """Validate one row: ``(values by column, target, split or None)``; raises _BadRow.

        The target is a label name, or ``{"answers": [...], "type": ...}`` with ``task: vqa``.
        """
        cfg = self.config
        label = self._target(row)
        split = None
        if has_split:
            split = row.get(cfg.split_column)
            split = None if _missing(split) else str(split).strip()
            if split not in SPLITS:
                raise _BadRow(f"split must be train, val or test (column '{cfg.split_column}'), got {split!r}")
        values: dict[str, Any] = {}
        for col, kind in scan.kinds.items():
            v = row.get(col)
            if _missing(v):
                values[col] = None
            elif kind in MEDIA_KINDS:
                values[col] = self._file(v, kind)
            elif kind == "vector":
                values[col] = self._vector(v, scan.dims[col])
            elif not isinstance(v, str):
                raise _BadRow(f"text column '{col}' must hold a string, got {v!r:.60}")
            else:
                values[col] = v
        if all(v is None for v in values.values()):
            raise _BadRow(f"has no modality at all (columns: {', '.join(scan.kinds)})")
        return values, label, split

    # -- dataset API ----------------------------------------------------------------------
    @property
    def default_modalities(self) -> tuple[str, ...]:
        return tuple(self.modality_specs())

    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Columns and their kinds from a scan of the manifest text; no media file is opened."""
        scan = self._scan
        specs = {}
        for col, kind in scan.kinds.items():
            if kind == "vector":
                specs[col] = ModalitySpec("vector", dim=scan.dims[col], description=f"manifest column '{col}'")
            elif kind == "audio":
                specs[col] = ModalitySpec("audio", description=f"manifest column '{col}'",
                                          extra={"sample_rate": self.config.sample_rate})
            elif kind == "video":
                specs[col] = ModalitySpec("video", description=f"manifest column '{col}'",
                                          extra={"max_frames": self.config.max_frames})
            else:
                specs[col] = ModalitySpec(kind, description=f"manifest column '{col}'")
        return specs

    def default_encoders(self) -> dict[str, dict[str, Any]]:
        """Frozen pretrained encoders, offline (see :func:`pretrained_default_encoders`)."""
        return pretrained_default_encoders(self._scan.kinds)

    def default_train(self) -> dict[str, Any]:
        """The default encoders are frozen, so: cache their features; and, for classification,
        where only the projectors, fusion and heads learn (often from few rows), batches of about
        rows / 64 (8 to 64, ~40 steps per epoch from 512 rows up) and a learning rate for heads.
        Media files are decoded in DataLoader workers, one per core but one (at most 4).
        Each applies only where the config sets nothing."""
        from fusionkit.data.loader import MEDIA_KINDS

        on_disk = any(kind in MEDIA_KINDS for kind in self._scan.kinds.values())
        workers = {"num_workers": min(4, max(0, (os.cpu_count() or 1) - 1))} if on_disk else {}
        if self.config.task != "classification":  # an LM decoder keeps the trainer's batch size and lr
            return {"cache_features": True, **workers}
        rows = len(self._scan.rows)
        # rows / 64, as a power of two: an epoch over the ~60% training rows has ~40 steps
        batch = 2 ** int(math.log2(max(rows // 64, 1)))
        return {"cache_features": True, "batch_size": min(max(batch, 8), 64), "lr": 3e-3, **workers}

    def load(self) -> DatasetBundle:
        cfg = self.config
        scan = self._scan
        skipped = [{"split": None, "id": line, "stage": "load", "reason": reason} for line, reason in scan.problems]
        has_split = cfg.split_column is not None and any(cfg.split_column in row for _, row in scan.rows)
        good: list[tuple[int, dict[str, Any], str, str | None]] = []
        for line, row in scan.rows:
            try:
                values, label, split = self._check_row(row, scan, has_split)
            except _BadRow as err:
                if cfg.on_bad_sample == "error":
                    raise DataError(f"{self._where(line)} {err}") from None
                skipped.append({"split": None, "id": line, "stage": "load", "reason": str(err)})
                continue
            good.append((line, values, label, split))
        if not good:
            raise DataError(f"manifest '{self.manifest}' has no usable row"
                            + (f" ({len(skipped)} skipped; first: line {skipped[0]['id']} {skipped[0]['reason']})"
                               if skipped else ""))
        if cfg.task in ("vqa", "captioning"):
            classes = []
            targets = np.empty(len(good), dtype=object)
            targets[:] = [g[2] for g in good]  # {"answers", "type"} or {"captions"} dicts
        else:
            classes = list(cfg.classes) if cfg.classes is not None else _sorted_labels({g[2] for g in good})
            index = {c: k for k, c in enumerate(classes)}
            targets = np.array([index[g[2]] for g in good])
        if has_split:
            assign = np.array([g[3] for g in good])
        elif cfg.task in ("vqa", "captioning"):
            assign = self._draw_grouped_split([self._context(g[1], g[0]) for g in good])
        else:
            assign = self._draw_split(targets)
        splits = {}
        for name in SPLITS:
            sel = np.flatnonzero(assign == name)
            if len(sel) == 0:
                how = (f"no row has {cfg.split_column}={name}" if has_split else
                       f"the drawn split left it empty; add rows or raise data.{name}_fraction")
                raise DataError(f"manifest '{self.manifest}': the '{name}' split is empty ({how})")
            splits[name] = ManifestSplit(
                {col: [good[i][1][col] for i in sel] for col in scan.kinds},
                targets[sel].tolist(), [good[i][0] for i in sel], kinds=dict(scan.kinds),
                manifest=str(self.manifest), name=name, sample_rate=cfg.sample_rate,
                max_frames=cfg.max_frames, on_bad_sample=cfg.on_bad_sample)
        info = {"manifest": str(self.manifest), "sizes": {k: len(v) for k, v in splits.items()},
                "skipped": skipped, "ignored_columns": scan.ignored,
                "split": "column" if has_split else f"drawn (seed {cfg.split_seed})", "task": cfg.task}
        if cfg.task == "vqa":
            info["question_modality"] = cfg.question
            info["answers"] = sorted({a for t in splits["train"].targets for a in t["answers"]})  # train only
        return DatasetBundle(splits, classes=classes, modalities=self.modality_specs(), info=info)

    def _context(self, values: dict[str, Any], line: int) -> tuple:
        """What a question is asked about: the row's other modality values (hashable); a row
        with none of them is its own group."""
        question = self.config.question if self.config.task == "vqa" else None
        context = tuple((col, v.tobytes() if isinstance(v, np.ndarray) else v)
                        for col, v in sorted(values.items()) if col != question and v is not None)
        return context or (("line", line),)

    def _draw_grouped_split(self, contexts: list[tuple]) -> np.ndarray:
        """VQA, captioning: a seeded split of the distinct contexts (e.g. images), so each stays in one split."""
        cfg = self.config
        groups = {c: k for k, c in enumerate(dict.fromkeys(contexts))}  # first-seen order
        order = np.random.default_rng(cfg.split_seed).permutation(len(groups))
        n_val, n_test = round(len(groups) * cfg.val_fraction), round(len(groups) * cfg.test_fraction)
        where = np.full(len(groups), "train", dtype=object)
        where[order[:n_val]] = "val"
        where[order[n_val:n_val + n_test]] = "test"
        return np.array([where[groups[c]] for c in contexts], dtype=object)

    def _draw_split(self, targets: np.ndarray) -> np.ndarray:
        """Stratified split: per class, a permutation seeded by ``split_seed`` cut into 3 parts."""
        cfg = self.config
        rng = np.random.default_rng(cfg.split_seed)
        assign = np.full(len(targets), "train", dtype=object)
        for k in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == k))
            n_val, n_test = round(len(idx) * cfg.val_fraction), round(len(idx) * cfg.test_fraction)
            assign[idx[:n_val]] = "val"
            assign[idx[n_val:n_val + n_test]] = "test"
        return assign
