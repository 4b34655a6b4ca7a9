"""From dataset items to model batches: per-sample preprocessing and a presence-aware collate.

A batch is ``{"inputs": {m: encoder batch of the samples that HAVE m}, "rows": {m: LongTensor of
those samples' positions}, "mask": (B, M) bool in sorted-name order, "target": (B,), "index": (B,)}``
plus whatever the task's target collate adds (VQA: reference answers, question types, ...).
Encoders therefore only ever see real inputs; the model scatters their outputs back by ``rows``.

Skipping bad samples (``data.on_bad_sample: skip``): a split may return a marker item
``{"skip": reason, "id": ..., "index": i}`` for a sample it cannot decode; preprocessing errors
of such a split become markers too. ``Collate`` leaves marked items out and lists them in
``batch["skipped"] = [(id, reason), ...]`` (always present, usually empty), so the trainer can
report them. A batch whose samples were all skipped has B = 0; callers skip it.

Streamed splits (an ``IterableDataset``, e.g. WebDataset shards) go through :class:`EncodedStream`
instead of :class:`EncodedDataset`; :func:`encoded` picks the right one. A DataLoader over a
stream takes ``shuffle=False``: the split shuffles itself (shard order and a sample buffer) and
splits its shards across DDP ranks and DataLoader workers.

DataLoader workers pay off only where reading an item decodes media: :func:`decodes_media` tells
the trainer which splits those are (a split held in memory, or whose media all come from the
feature cache, is read in the main process).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from fusionkit.encoders.base import Encoder
from fusionkit.errors import DataError, FusionkitError

MEDIA_KINDS = ("image", "audio", "video")  # what takes decoding; text and inline vectors do not


def decodes_media(split: Dataset) -> bool:
    """Whether reading ``split``'s items decodes images, audio or video (from files or bytes).

    Wrappers (a :class:`~fusionkit.data.cache.CachedSplit`, an augmented split) are looked
    through; modalities the feature cache serves are not decoded. Streams always decode; a split
    of unknown type (a plugin's) is assumed to; an in-memory ``MultimodalSplit`` (digits) never does.
    """
    from fusionkit.datasets.base import MultimodalSplit

    served: set[str] = set()
    while not isinstance(split, IterableDataset) and hasattr(split, "split"):
        served |= set(getattr(split, "features", None) or ())
        split = split.split
    if isinstance(split, IterableDataset):
        return True
    kinds = getattr(split, "kinds", None)
    if kinds is None:
        return type(split) is not MultimodalSplit
    return any(kind in MEDIA_KINDS and m not in served for m, kind in kinds.items())


def _as_is(item: Any) -> Any:
    return item


def ordered_items(split: Dataset, workers: int = 0, ahead: int = 64):
    """``split[0], split[1], ...`` in order; decoded up to ``ahead`` items ahead in ``workers``
    DataLoader workers when that is more than 0 and the split decodes media (:func:`decodes_media`).
    The global RNG is left alone (the workers' seeds come from a generator of their own)."""
    if workers <= 0 or not decodes_media(split):
        yield from (split[i] for i in range(len(split)))
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(split, batch_size=None, num_workers=workers, collate_fn=_as_is,
                          prefetch_factor=max(1, ahead // workers), generator=torch.Generator().manual_seed(0))


class EncodedDataset(Dataset):
    """Applies each modality's ``encoder.preprocess`` to one item (runs in DataLoader workers)."""

    def __init__(self, split: Dataset, encoders: dict[str, Encoder]):
        self.split = split
        self.encoders = encoders

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = getattr(self.split, "ids", None)
        describe = getattr(self.split, "describe", None)  # e.g. "manifest 'x.jsonl' line 7"
        ident = ids[i] if ids else i
        return _encode(self.split, self.encoders, self.split[i], ident,
                       lambda: describe(i) if describe else f"sample {ident}")


class EncodedStream(IterableDataset):
    """:class:`EncodedDataset` for a streamed split: preprocesses items as the split yields them
    (in each DataLoader worker). Items carry their ``id``; ``len`` is the split's."""

    def __init__(self, split: IterableDataset, encoders: dict[str, Encoder]):
        self.split = split
        self.encoders = encoders

    def __len__(self) -> int:
        return len(self.split)

    def __iter__(self):
        for item in self.split:
            ident = item.get("id", item["index"])
            yield _encode(self.split, self.encoders, item, ident, lambda: f"sample '{ident}'")


def encoded(split: Dataset, encoders: dict[str, Encoder]) -> Dataset:
    """:class:`EncodedStream` for a streamed split (build its DataLoader with ``shuffle=False``),
    :class:`EncodedDataset` for any other."""
    return EncodedStream(split, encoders) if isinstance(split, IterableDataset) else EncodedDataset(split, encoders)


def _encode(split, encoders: dict[str, Encoder], item: dict[str, Any], ident: Any, where) -> dict[str, Any]:
    """One split item -> preprocessed inputs, or a skip marker (``where()`` names it in errors)."""
    if "skip" in item:  # the split could not decode this sample and skipping is on
        return {"skip": item["skip"], "id": item.get("id", ident), "index": item["index"]}
    inputs = {}
    for m, enc in encoders.items():
        raw = item["inputs"].get(m)
        try:
            inputs[m] = None if raw is None else enc.preprocess(raw)
        except FusionkitError as err:
            if getattr(split, "on_bad_sample", "error") == "skip":
                return {"skip": f"modality '{m}': {err}", "id": ident, "index": item["index"]}
            raise DataError(f"{where()}, modality '{m}': {err}") from None
    return {"inputs": inputs, "target": item["target"], "index": item["index"]}


class Collate:
    """Collate preprocessed items into a batch (picklable, so DataLoader workers can use it)."""

    def __init__(self, encoders: dict[str, Encoder], collate_targets=None):
        self.encoders = encoders
        self.modalities = sorted(encoders)
        # the task's target collate (fusionkit.tasks); default: class indices as a long tensor
        self.collate_targets = collate_targets

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = [(it["id"], it["skip"]) for it in items if "skip" in it]
        items = [it for it in items if "skip" not in it]
        mask = torch.tensor([[it["inputs"][m] is not None for m in self.modalities] for it in items],
                            dtype=torch.bool).reshape(len(items), len(self.modalities))  # (B, M), B may be 0
        inputs, rows = {}, {}
        for j, m in enumerate(self.modalities):
            present = mask[:, j].nonzero().flatten()
            rows[m] = present
            inputs[m] = self.encoders[m].collate([items[i]["inputs"][m] for i in present.tolist()]) \
                if len(present) else None
        targets = [it["target"] for it in items]
        collated = self.collate_targets(targets) if self.collate_targets is not None \
            else {"target": torch.tensor(targets, dtype=torch.long)}
        return {"inputs": inputs, "rows": rows, "mask": mask, **collated,
                "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                "skipped": skipped}
