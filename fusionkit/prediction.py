"""Predictions for new inputs without labels: rows of a JSONL file through a trained run.

Used by ``fusionkit predict`` (every task), ``fusionkit generate`` and ``fusionkit retrieve``.

Rows (:func:`read_rows`) are read like the rows of a manifest, minus the label:

- one JSON object per line, keyed by the run's modality names; other keys (``id``, ``label``,
  ``split`` ...) are ignored, and ``id``, when present, names the row in the output;
- paths (images, audio, video, ``.npy`` vectors) are relative to the JSONL file's folder;
  a vector is an inline list of numbers or a ``.npy`` path, of the length the run was trained on;
- a missing key, ``null`` or an empty string means the sample lacks that modality: it is masked
  out and gets weight exactly 0. A row needs at least one of the run's modalities.

Values are checked when the file is read (a wrong type, a missing file or a wrong vector length
is a one-line ``DataError`` naming the line) and decoded later, in DataLoader workers, so a
large file never sits in memory as pixels.

Records (:func:`predict_records`, :func:`rank_records`) hold ``id`` and ``line``, the fusion
``weights`` per modality (0 for a missing one) and the ``present`` modalities, plus what the task
predicts: ``label`` and ``probs`` (classification), ``text`` (VQA, captioning) or ``matches``
(retrieval: the best gallery texts and their cosine similarity); ``heads`` holds each present
modality's own head (probe) prediction where the task has a fixed probe space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionkit.datasets.base import MultimodalSplit
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError

DIGITS = 6  # probabilities and weights are rounded to this many decimals in the records


def jsonl_objects(path: Path, option: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file given as ``option``;
    a one-line DataError for a missing file or a line that is not a JSON object."""
    if not path.is_file():
        raise DataError(f"{option} '{path}' is not a file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{option} '{path}' line {n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{option} '{path}' line {n}: expected a JSON object")
        rows.append((n, row))
    return rows


def missing(value: Any) -> bool:
    """A manifest's rule: no value, null or a blank string means the modality is absent."""
    return value is None or (isinstance(value, str) and not value.strip())


# -- one value: checked when read, decoded when used -----------------------------------------------
def check_value(spec: ModalitySpec, value: Any, base: Path | None) -> Any:
    """A JSONL or command-line value -> what is kept until decoding: text as given, an inline
    vector as float32 ``(D,)``, a file path made absolute (relative paths are read from ``base``).

    Raises:
        DataError: a value of the wrong type, a file that does not exist, a vector of the wrong
            length (one line, without the row's position: the caller adds it).
    """
    kind = spec.kind
    if kind == "text":
        if not isinstance(value, str):
            raise DataError(f"a text value must be a string, got {value!r:.60}")
        return value
    if kind == "vector" and isinstance(value, list):
        bad = next((x for x in value if isinstance(x, bool) or not isinstance(x, (int, float))
                    or not math.isfinite(x)), None)
        if bad is not None or not value:
            raise DataError(f"a vector must be a non-empty list of finite numbers, got {value!r:.60}")
        return _check_length(np.asarray(value, dtype=np.float32), spec, "vector")
    if kind not in ("image", "audio", "video", "vector"):
        return value  # a plugin's kind: its encoder reads the JSON value as it is
    if not isinstance(value, str):
        also = " or a list of numbers" if kind == "vector" else ""
        article = "an" if kind[0] in "aeiou" else "a"
        raise DataError(f"{article} {kind} value must be a file path{also}, got {value!r:.60}")
    path = Path(value.strip()).expanduser()
    full = path if path.is_absolute() or base is None else base / path
    if not full.is_file():
        raise DataError(f"{kind} file '{value}' does not exist (looked for {full})")
    if kind == "vector":
        _check_length(_read_npy(full, mmap=True), spec, f"vector file '{value}'")
    return str(full)


def _read_npy(path: Path | str, mmap: bool = False) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"vector file '{path}' cannot be read: {err}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"vector file '{path}' holds a {arr.dtype} array of shape {arr.shape}; expected (D,)")
    return arr


def _check_length(vec: np.ndarray, spec: ModalitySpec, what: str) -> np.ndarray:
    if spec.dim is not None and vec.shape != (spec.dim,):
        raise DataError(f"{what} has length {vec.shape[0]}; this run's vectors have length {spec.dim}")
    return vec


def decode(spec: ModalitySpec, value: Any) -> Any:
    """A checked value -> the raw value the modality's encoder takes (as a dataset would give it)."""
    from fusionkit.data import media

    if spec.kind == "image":
        return media.load_image(value)
    if spec.kind == "audio":
        return media.load_audio(value, spec.extra.get("sample_rate", 16000))  # (C, T) float32
    if spec.kind == "video":
        return media.load_video(value, spec.extra.get("max_frames", 32))[0]  # (F, H, W, 3) uint8
    if spec.kind == "vector" and isinstance(value, str):
        return np.asarray(_read_npy(value), dtype=np.float32)  # (D,)
    return value


# -- rows ------------------------------------------------------------------------------------------
class InputRows(MultimodalSplit):
    """Samples without labels whose values are decoded on access (in DataLoader workers).

    Args:
        columns: modality -> checked values (:func:`check_value`), None where a row lacks it.
        lines: where each row comes from (JSONL line numbers; None for a command-line sample);
            the split's ``ids``.
        names: each row's name in the output (its ``id`` field, else its line number).
        specs: the run's modalities.
        source: how errors name the input, e.g. ``--data 'rows.jsonl'``.
    """

    def __init__(self, columns: dict[str, list[Any]], lines: list[int], names: list[Any],
                 specs: dict[str, ModalitySpec], source: str):
        super().__init__(columns, [None] * len(lines), lines)  # None: no target (tasks collate it as unlabelled)
        self.names = list(names)
        self.specs = specs
        self.source = source

    def describe(self, i: int) -> str:
        return self.source if self.ids[i] is None else f"{self.source} line {self.ids[i]}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {}
        for m, values in self.columns.items():
            try:
                inputs[m] = None if values[i] is None else decode(self.specs[m], values[i])
            except DataError as err:
                raise DataError(f"{self.describe(i)}, modality '{m}': {err}") from None
        return {"inputs": inputs, "target": None, "index": i}


def make_rows(rows: list[tuple[int, dict[str, Any]]], specs: dict[str, ModalitySpec], base: Path | None,
              source: str) -> InputRows:
    """Check ``(line, object)`` rows against the run's modalities (see the module docstring)."""
    if not rows:
        raise DataError(f"{source} is empty")
    columns: dict[str, list[Any]] = {m: [] for m in specs}
    names = []
    for n, row in rows:
        where = f"{source} line {n}"
        if all(missing(row.get(m)) for m in specs):
            has = ", ".join(sorted(k for k, v in row.items() if not missing(v))) or "no values"
            raise DataError(f"{where}: none of the run's modalities {sorted(specs)} is present (the row has: {has})")
        for m, spec in specs.items():
            try:
                columns[m].append(None if missing(row.get(m)) else check_value(spec, row[m], base))
            except DataError as err:
                raise DataError(f"{where}, modality '{m}': {err}") from None
        names.append(row["id"] if "id" not in specs and row.get("id") is not None else n)
    return InputRows(columns, [n for n, _ in rows], names, specs, source)


def read_rows(path: Path, specs: dict[str, ModalitySpec], option: str = "--data") -> InputRows:
    """The rows of a JSONL file, checked; paths relative to the file's folder."""
    path = Path(path)
    return make_rows(jsonl_objects(path, option), specs, path.parent, f"{option} '{path}'")


def sample_rows(given: dict[str, Any], specs: dict[str, ModalitySpec]) -> InputRows:
    """One sample from the command line (``{modality: value}``; paths relative to the current
    folder; modalities left out are missing). Errors name the modality."""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise DataError(f"this run's modalities are {sorted(specs)}; it has no {unknown}")
    values = {}
    for m, spec in specs.items():
        try:
            values[m] = None if missing(given.get(m)) else check_value(spec, given[m], None)
        except DataError as err:
            raise DataError(f"{m}: {err}") from None
    if all(v is None for v in values.values()):
        raise DataError(f"no value for any of the run's modalities {sorted(specs)}")
    return InputRows({m: [v] for m, v in values.items()}, [None], [0], specs, "the sample")


def run_specs(cfg) -> dict[str, ModalitySpec]:
    """The modalities of a run's resolved config, from its dataset's description (no data read)."""
    from fusionkit.registry import registry

    specs = registry("datasets").build(cfg.data, "data").modality_specs()
    return {m: specs[m] for m in cfg.modalities}


# -- records ---------------------------------------------------------------------------------------
def _fusion_fields(weights: torch.Tensor, mask: torch.Tensor, modalities: list[str]) -> dict[str, Any]:
    """``weights`` ``(M,)`` and ``mask`` ``(M,)`` of one sample -> its record fields."""
    return {"weights": {m: round(float(weights[j]), DIGITS) for j, m in enumerate(modalities)},
            "present": [m for j, m in enumerate(modalities) if bool(mask[j])]}


def predict_records(model, cfg, rows: InputRows, progress: Callable[[int], None] | None = None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """One record per row (see the module docstring), in row order, for classification and
    generative runs. Batches, MC-dropout seeding and decoding are those of ``fusionkit eval``
    (:func:`fusionkit.evaluation.collect`), so a row gets what ``eval`` computes for the same
    sample in the same batch."""
    from fusionkit.evaluation import collect
    from fusionkit.training.trainer import make_loader

    c = collect(model, make_loader(model, rows, cfg, shuffle=False), seed=seed, progress=progress)
    classes = model.task.probe_classes
    records = []
    for k, i in sorted(enumerate(c["index"].tolist()), key=lambda item: item[1]):
        record: dict[str, Any] = {"id": rows.names[i], "line": rows.ids[i]}
        if "predictions" in c:  # generated text (VQA answers, captions)
            record["text"] = c["predictions"][k]
        if "probs" in c:  # class probabilities
            probs = c["probs"][k]  # (K,)
            record["label"] = classes[int(probs.argmax())]
            record["probs"] = {name: round(float(p), DIGITS) for name, p in zip(classes, probs)}
        record.update(_fusion_fields(c["weights"][k], c["mask"][k], model.modalities))
        if classes:  # each present modality's head on its own: the class (or probe answer) it picks
            head = c["unimodal_probs"][k]  # (M, K)
            record["heads"] = {m: {"label": classes[int(head[j].argmax())], "p": round(float(head[j].max()), DIGITS)}
                               if bool(c["mask"][k, j]) else None for j, m in enumerate(model.modalities)}
        records.append(record)
    return records


@torch.no_grad()
def rank_records(model, cfg, rows: InputRows, gallery: list[str], top: int,
                 progress: Callable[[int], None] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Retrieval runs: the ``top`` gallery texts closest to each row's fused query (cosine
    similarity), as ``matches`` ``[{"text", "score"}]``, best first; the probes score the query's
    modalities against the whole gallery, as ``fusionkit retrieve`` does."""
    from fusionkit.tasks.retrieval import embed_queries
    from fusionkit.training.trainer import make_loader

    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # MC dropout: the same numbers on every call
        candidates = model.decoder.embed_texts(gallery)  # (N, E)
        for batch in make_loader(model, rows, cfg, shuffle=False):
            query, fused = embed_queries(model, batch, candidates)  # (B, E)
            best = (query @ candidates.T).topk(min(top, len(gallery)))  # (B, top): cosine similarities
            for b, i in enumerate(batch["index"].tolist()):
                matches = [{"text": gallery[j], "score": round(float(s), DIGITS)}
                           for s, j in zip(best.values[b].tolist(), best.indices[b].tolist())]
                records.append({"id": rows.names[i], "line": rows.ids[i], "matches": matches,
                                **_fusion_fields(fused.weights[b], fused.mask[b], model.modalities)})
            if progress is not None:
                progress(len(batch["index"]))
    model.train(was_training)
    return records
