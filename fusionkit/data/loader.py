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
feature cache, is read in the main process). Such an in-memory split goes through
:class:`PreparedSplit` instead: preprocessed once, stacked per modality, and served a whole batch
per call (the same batches as :class:`Collate` makes, without per-sample Python work).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
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


def _stacks(encoder) -> bool:
    """Whether ``encoder.collate`` is a plain ``torch.stack`` of its items."""
    from fusionkit.data.cache import PrecomputedEncoder

    if isinstance(encoder, PrecomputedEncoder):
        return encoder.token_dim is None
    return type(encoder).collate is Encoder.collate


class PreparedSplit(Dataset):
    """A split held in memory, preprocessed once and served a whole batch per call.

    Every item goes through ``encoder.preprocess`` once, here (errors are raised as
    :class:`EncodedDataset` raises them). A modality whose encoder collates with ``torch.stack``
    and whose preprocessed values all have one shape is stacked into one tensor; the others keep
    their preprocessed values and are collated per batch. A DataLoader over it must take
    ``collate_fn=``:func:`as_batch`: :meth:`__getitems__` returns the finished batch, equal to what
    :class:`Collate` makes of the same items.

    Build it with :func:`prepare`, which says where it applies (nothing decodes media, no sample
    is skipped, every encoder's ``preprocess`` is deterministic).
    """

    def __init__(self, columns: dict[str, list[Any]], targets: list[Any], index: Tensor,
                 encoders: dict[str, Encoder], collate_targets=None, stacked: dict[str, Tensor] | None = None):
        """``columns``: per modality, each sample's preprocessed value (None: absent);
        ``targets`` and ``index`` ``(N,)``: each sample's; ``stacked``: modalities whose present
        values are already stacked in order, ``(n_m, ...)`` (their column then only says which
        samples have them)."""
        stacked = stacked or {}
        self.encoders = encoders
        self.modalities = sorted(encoders)
        self.collate_targets = collate_targets
        n = len(targets)
        self.mask = torch.tensor([[v is not None for v in columns[m]] for m in self.modalities],
                                 dtype=torch.bool).T.reshape(n, len(self.modalities))  # (N, M)
        self.targets = list(targets)
        self.index = index  # (N,)
        self.stacked: dict[str, tuple[Tensor, Tensor]] = {}  # m -> (row of each sample in values, -1 if absent; values)
        self.values: dict[str, list[Any]] = {}  # m -> per-sample preprocessed value (None if absent)
        for j, m in enumerate(self.modalities):
            values = stacked.get(m)
            if values is None:
                present = [v for v in columns[m] if v is not None]
                if _stacks(encoders[m]) and present and all(isinstance(v, Tensor) for v in present) \
                        and len({tuple(v.shape) for v in present}) == 1:
                    values = torch.stack(present)
            if values is None:
                self.values[m] = columns[m]
                continue
            position = torch.full((n,), -1, dtype=torch.long)
            position[self.mask[:, j]] = torch.arange(len(values))
            self.stacked[m] = (position, values)  # (N,), (n_m, ...)
        self.complete = {m for j, m in enumerate(self.modalities) if m in self.stacked and bool(self.mask[:, j].all())}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        mask = self.mask[idx]  # (B, M)
        inputs, rows = {}, {}
        everyone = torch.arange(len(idx))  # (B,)
        for j, m in enumerate(self.modalities):
            if m in self.complete:  # every sample has it: no gaps to look up
                rows[m], inputs[m] = everyone, self.stacked[m][1][idx]
                continue
            present = mask[:, j].nonzero().flatten()
            rows[m] = present
            if not len(present):
                inputs[m] = None
            elif m in self.stacked:
                position, values = self.stacked[m]
                inputs[m] = values[position[idx[present]]]
            else:
                column = self.values[m]
                inputs[m] = self.encoders[m].collate([column[i] for i in idx[present].tolist()])
        targets = [self.targets[i] for i in indices]
        collated = self.collate_targets(targets) if self.collate_targets is not None \
            else {"target": torch.tensor(targets, dtype=torch.long)}
        return {"inputs": inputs, "rows": rows, "mask": mask, **collated, "index": self.index[idx], "skipped": []}


def as_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The collate function of a DataLoader over a :class:`PreparedSplit` (its batches are finished)."""
    return batch


def prepare(split: Dataset, encoders: dict[str, Encoder], collate_targets=None) -> PreparedSplit | None:
    """``split`` as a :class:`PreparedSplit`, or None where it does not apply: a split that decodes
    media or streams, one whose items change between epochs (``train.augment``), an encoder whose
    ``preprocess`` is random, or a split with skipped samples (they are reported by :class:`Collate`)."""
    from fusionkit.training.augment import AugmentedSplit

    wrapped = split
    while hasattr(wrapped, "split") and not isinstance(wrapped, IterableDataset):
        if isinstance(wrapped, AugmentedSplit) and wrapped.augmentations:
            return None  # its items change every epoch
        wrapped = wrapped.split
    if isinstance(split, IterableDataset) or decodes_media(split) \
            or not all(getattr(e, "deterministic_preprocess", True) for e in encoders.values()):
        return None
    by_column = _prepare_columns(split, encoders, collate_targets)
    if by_column is not None:
        return by_column
    encoded_split = EncodedDataset(split, encoders)
    items = [encoded_split[i] for i in range(len(split))]
    if any("skip" in it for it in items):
        return None
    columns = {m: [it["inputs"][m] for it in items] for m in encoders}
    return PreparedSplit(columns, [it["target"] for it in items],
                         torch.tensor([it["index"] for it in items], dtype=torch.long), encoders, collate_targets)


def _prepare_columns(split: Dataset, encoders: dict[str, Encoder], collate_targets=None) -> PreparedSplit | None:
    """:func:`prepare` one column at a time: a plain in-memory split (:class:`MultimodalSplit`)
    whose every encoder preprocesses a whole column at once (``Encoder.preprocess_column``) and
    collates by stacking. The same :class:`PreparedSplit` as the per-sample path; None where this
    does not apply (that path then runs, and raises any preprocessing error by sample)."""
    from fusionkit.datasets.base import MultimodalSplit

    if type(split) is not MultimodalSplit or set(split.columns) != set(encoders):
        return None
    stacked = {}
    for m, column in split.columns.items():
        raws = [v for v in column if v is not None]
        stacked[m] = encoders[m].preprocess_column(raws) if raws and _stacks(encoders[m]) else None
        if stacked[m] is None:
            return None
    # a MultimodalSplit's item i has index i
    return PreparedSplit(split.columns, split.targets, torch.arange(len(split)), encoders, collate_targets, stacked)
