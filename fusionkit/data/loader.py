"""From dataset items to model batches: per-sample preprocessing and a presence-aware collate.

A batch is ``{"inputs": {m: encoder batch of the samples that HAVE m}, "rows": {m: LongTensor of
those samples' positions}, "mask": (B, M) bool in sorted-name order, "target": (B,), "index": (B,)}``.
Encoders therefore only ever see real inputs; the model scatters their outputs back by ``rows``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from fusionkit.encoders.base import Encoder
from fusionkit.errors import DataError, FusionkitError


class EncodedDataset(Dataset):
    """Applies each modality's ``encoder.preprocess`` to one item (runs in DataLoader workers)."""

    def __init__(self, split: Dataset, encoders: dict[str, Encoder]):
        self.split = split
        self.encoders = encoders

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.split[i]
        inputs = {}
        for m, enc in self.encoders.items():
            raw = item["inputs"].get(m)
            try:
                inputs[m] = None if raw is None else enc.preprocess(raw)
            except FusionkitError as err:
                ident = getattr(self.split, "ids", None)
                where = f"sample {ident[i] if ident else i}"
                raise DataError(f"{where}, modality '{m}': {err}") from None
        return {"inputs": inputs, "target": item["target"], "index": item["index"]}


class Collate:
    """Collate preprocessed items into a batch (picklable, so DataLoader workers can use it)."""

    def __init__(self, encoders: dict[str, Encoder]):
        self.encoders = encoders
        self.modalities = sorted(encoders)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        mask = torch.tensor([[it["inputs"][m] is not None for m in self.modalities] for it in items],
                            dtype=torch.bool)  # (B, M)
        inputs, rows = {}, {}
        for j, m in enumerate(self.modalities):
            present = mask[:, j].nonzero().flatten()
            rows[m] = present
            inputs[m] = self.encoders[m].collate([items[i]["inputs"][m] for i in present.tolist()]) \
                if len(present) else None
        return {"inputs": inputs, "rows": rows, "mask": mask,
                "target": torch.tensor([it["target"] for it in items], dtype=torch.long),
                "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
