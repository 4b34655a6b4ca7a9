"""easy-VQA: 64x64 images of one coloured shape, with templated questions about it (offline).

The data ship inside the ``easy-vqa==1.0`` package (MIT): 4,000 train images with 38,575
questions, 1,000 test images with 9,673 questions, 13 answers (yes, no, 3 shapes, 8 colours).
It is read through the package's own API (``get_train_questions``, ``get_test_image_paths``,
``get_answers``, ...). Modalities:

- ``image``: the 64x64 picture as an RGB PIL image, decoded when the bundle loads (5,000 tiny
  files, about 3 s; 60 MB in memory). The questions about one picture share one image object,
  so treat it as read-only (corruptions and transforms return new images).
- ``text``: the question (so ``--corrupt text:typos`` and ``missing:text`` act on it).

Targets are ``{"answers": [answer], "type": question type}``, one reference answer each. The
package has no question type: it is *derived from the answer* here, ``"yes/no"`` for yes/no,
``"shape"`` for circle/rectangle/triangle and ``"color"`` for a colour (None for an answer
outside these sets, which 1.0 does not have).

Splits: ``test`` is the package's test split. ``val`` comes from the package's *train* split by
image: a ``val_fraction`` share of the train images, drawn with ``split_seed``, gives all its
questions to val, so no image is in both train and val. ``max_train_questions`` caps train + val
together (val gets ``round(max * val_fraction)`` of them, train the rest) and
``max_test_questions`` caps test; each cap draws a seeded sample stratified by answer (so by
type too): every answer keeps its share of the pool, up to rounding (largest remainders).

``task: captioning`` gives one sample per *image* (modality ``image`` only) with template-made
reference captions: the package has no captions, so each image's shape and colour are derived
from its own question-answer pairs (:func:`image_facts`: "what color is the shape?" -> blue,
"what is the blue shape?" -> rectangle, "is there not a red shape?" -> no ...) and phrased by
:func:`captions_for`. The first reference is always the canonical "a blue rectangle"; the other
``captions_per_image - 1`` are distinct phrasings ("there is a blue rectangle in the image", "a
rectangle that is blue", ...) drawn by a generator seeded with ``caption_seed`` and the image.
An image whose questions reveal only its shape or only its colour is captioned with what is
known ("a blue shape", "a rectangle"); one that reveals neither (about 1%) is left out and
counted in ``info["captions"]``. The val images are the same as for VQA; ``max_train_images``
(train + val) and ``max_test_images`` cap the images, stratified by canonical caption.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fusionkit.datasets.base import DatasetBundle, DatasetConfig, MultimodalDataset, MultimodalSplit
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError
from fusionkit.registry import register

YES_NO = frozenset({"yes", "no"})
SHAPES = frozenset({"circle", "rectangle", "triangle"})
COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
# Caption phrasings after the canonical "a {thing}" ({thing}: "red circle", "red shape" or
# "circle"); those naming {color} apart need the colour. All are template-made.
PHRASINGS = ("there is a {thing} in the image", "the image shows a {thing}", "a picture of a {thing}",
             "a {noun} that is {color}", "a {noun} coloured {color}")


def image_facts(qa: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """``(shape, colour)`` of one image from its questions and answers (None where unknown).

    An answer that is a shape (colour) gives the shape (colour), and a colour (shape) named in
    the same question holds too ("what is the blue shape?" -> rectangle). A yes/no answer makes
    the shape or colour the question names true, or false when the question is negated ("not",
    "no"); a shape (colour) is also known once all the others are ruled out.
    """
    found: dict[str, set[str]] = {"shape": set(), "color": set()}
    ruled_out: dict[str, set[str]] = {"shape": set(), "color": set()}
    for question, answer in qa:
        words = re.findall(r"[a-z]+", question.lower())
        named = {"shape": SHAPES.intersection(words), "color": COLORS.intersection(words)}
        if answer in SHAPES or answer in COLORS:
            kind, other = ("shape", "color") if answer in SHAPES else ("color", "shape")
            found[kind].add(answer)
            found[other] |= named[other]
        elif answer in YES_NO:
            true = (answer == "yes") != ("not" in words or "no" in words)
            for kind in ("shape", "color"):
                (found if true else ruled_out)[kind] |= named[kind]
    facts = []
    for kind, every in (("shape", SHAPES), ("color", COLORS)):
        known = found[kind] or (every - ruled_out[kind] if len(every - ruled_out[kind]) == 1 else set())
        facts.append(next(iter(known)) if len(known) == 1 else None)  # two answers disagreeing: unknown
    return facts[0], facts[1]


def captions_for(shape: str | None, color: str | None, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct captions: the canonical "a {color} {shape}" first, then seeded phrasings."""
    noun = shape or "shape"
    thing = f"{color} {noun}" if color else noun
    pool = [p for p in PHRASINGS if color or "{color}" not in p]
    picked = [pool[i] for i in rng.permutation(len(pool))[: n - 1]]
    return [f"a {thing}", *(p.format(thing=thing, noun=noun, color=color) for p in picked)]


def question_type(answer: str) -> str | None:
    """Type derived from the answer (easy-VQA has no type field): yes/no, shape or color."""
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    return None


def stratified_sample(strata: list[str], k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``k`` items drawn so each stratum keeps its share of ``strata``.

    Quotas are ``k * n_s / n`` rounded down, the remainder going to the largest fractional
    parts (ties: the stratum named first in sorted order); within a stratum the items are a
    seeded permutation's first ``quota``. ``k >= len(strata)`` keeps everything.
    """
    n = len(strata)
    if k >= n:
        return np.arange(n)
    labels = np.asarray(strata, dtype=object)
    names = sorted(set(strata))
    counts = np.array([int((labels == s).sum()) for s in names])
    exact = k * counts / n
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")  # largest remainder first
    quota[order[: k - quota.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == s))[:q] for s, q in zip(names, quota)]
    return np.sort(np.concatenate(picked))


def _load_rgb(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # a new, fully decoded image; the file is closed here
    except OSError as err:
        raise DataError(f"easy-vqa image '{path}' cannot be decoded: {err}") from None


class EasyVQAConfig(DatasetConfig):
    max_train_questions: int | None = Field(None, ge=2, description=(
        "questions kept from the package's train split, train + val together (a seeded sample "
        "stratified by answer); None = all 38,575. Small values make tests and smoke runs fast"))
    max_test_questions: int | None = Field(None, ge=1, description=(
        "questions kept from the package's test split (seeded, stratified by answer); None = all 9,673"))
    val_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "share of the train *images* whose questions form val, so no image is in train and val"))
    split_seed: int = Field(0, description=(
        "fixes the val images and the capped samples, independent of the training seed"))
    task: Literal["vqa", "captioning"] = Field("vqa", description=(
        "vqa: one sample per question (image + question -> answers); captioning: one sample per "
        "image (image -> template-made reference captions)"))
    captions_per_image: int = Field(3, ge=1, le=1 + len(PHRASINGS), description=(
        "captioning: references per image, the canonical 'a red circle' plus seeded phrasings; "
        "several references make BLEU, METEOR and CIDEr reward any of them"))
    caption_seed: int = Field(0, description="captioning: fixes which phrasings each image gets")
    max_train_images: int | None = Field(None, ge=2, description=(
        "captioning: train + val images kept (seeded, stratified by caption); None = all ~4,000"))
    max_test_images: int | None = Field(None, ge=1, description=(
        "captioning: test images kept (seeded, stratified by caption); None = all ~1,000"))

    @model_validator(mode="after")
    def _task_fields(self):
        if self.task == "captioning" and (self.max_train_questions is not None or self.max_test_questions is not None):
            raise ValueError("max_train_questions / max_test_questions cap VQA questions; with task captioning "
                             "use max_train_images / max_test_images")
        if self.task == "vqa" and (self.max_train_images is not None or self.max_test_images is not None):
            raise ValueError("max_train_images / max_test_images are for task captioning; with task vqa use "
                             "max_train_questions / max_test_questions")
        return self


@register("datasets", "easy_vqa")
class EasyVQADataset(MultimodalDataset):
    """easy-VQA (easy-vqa package, offline): 64x64 shape images and questions, 13 answers."""

    Config = EasyVQAConfig

    @property
    def default_modalities(self) -> tuple[str, ...]:
        return tuple(self.modality_specs())

    def modality_specs(self) -> dict[str, ModalitySpec]:
        specs = {"image": ModalitySpec("image", channels=3, description="64x64 RGB image of one coloured shape")}
        if self.config.task == "vqa":  # a captioning sample is an image alone
            specs["text"] = ModalitySpec("text", description="the question about the image")
        return specs

    def default_encoders(self) -> dict[str, dict[str, Any]]:
        # frozen pretrained towers: ImageNet EfficientNet-Lite0 (bundled weights) at the native
        # 64x64, and all-MiniLM-L6-v2 for the templated questions
        return {"image": {"name": "timm", "model_name": "efficientnet_lite0", "pretrained": "bundled",
                          "trainable": False, "image_size": 64},
                "text": {"name": "hf_text", "model": "minilm", "trainable": False}}

    def _package(self):
        try:
            import easy_vqa
        except ImportError:
            raise DataError("dataset easy_vqa needs the easy-vqa package: pip install easy-vqa==1.0") from None
        return easy_vqa

    def _val_images(self, image_ids: list[int]) -> set[int]:
        """A ``val_fraction`` share of the train images, drawn with ``split_seed``."""
        ids = np.array(sorted(set(image_ids)))
        rng = np.random.default_rng([self.config.split_seed, 0])
        n_val = max(1, round(len(ids) * self.config.val_fraction))
        return set(rng.permutation(ids)[:n_val].tolist())

    def load(self) -> DatasetBundle:
        if self.config.task == "captioning":
            return self._load_captions()
        cfg = self.config
        pkg = self._package()
        answer_list = list(pkg.get_answers())
        train_q, test_q = pkg.get_train_questions(), pkg.get_test_questions()  # (texts, answers, image ids)
        paths = {"train": pkg.get_train_image_paths(), "test": pkg.get_test_image_paths()}

        val_images = self._val_images(train_q[2])
        in_val = np.array([im in val_images for im in train_q[2]])
        pools = {"train": ("train", np.flatnonzero(~in_val)), "val": ("train", np.flatnonzero(in_val)),
                 "test": ("test", np.arange(len(test_q[0])))}
        wanted: dict[str, int | None] = {"test": cfg.max_test_questions}
        if cfg.max_train_questions is None:
            wanted.update(train=None, val=None)
        else:
            # at least one val question, so a tiny smoke run still has a val split
            n_val = min(max(1, round(cfg.max_train_questions * cfg.val_fraction)), len(pools["val"][1]))
            wanted.update(val=n_val, train=cfg.max_train_questions - n_val)

        questions = {"train": train_q, "test": test_q}
        images: dict[tuple[str, int], Any] = {}  # one decoded image shared by its questions
        splits, image_ids = {}, {}
        for offset, (name, (source, pool)) in enumerate(pools.items(), 1):
            texts, answers, ims = questions[source]
            if wanted[name] is not None:
                rng = np.random.default_rng([cfg.split_seed, offset])
                pool = pool[stratified_sample([answers[i] for i in pool], wanted[name], rng)]
            for i in pool:
                key = (source, ims[i])
                if key not in images:
                    if ims[i] not in paths[source]:
                        raise DataError(f"easy-vqa {source} question {i} names image {ims[i]}, "
                                        f"which the package does not have; reinstall easy-vqa==1.0")
                    images[key] = _load_rgb(paths[source][ims[i]])
            splits[name] = MultimodalSplit(
                {"image": [images[(source, ims[i])] for i in pool], "text": [texts[i] for i in pool]},
                [{"answers": [answers[i]], "type": question_type(answers[i])} for i in pool],
                [f"{source}:{i}" for i in pool])
            image_ids[name] = [ims[i] for i in pool]

        info = {"task": "vqa", "question_modality": "text", "answers": answer_list,
                "sizes": {k: len(v) for k, v in splits.items()},
                "images": {k: len(set(v)) for k, v in image_ids.items()},
                "types": {k: dict(sorted(Counter(str(t["type"]) for t in s.targets).items()))
                          for k, s in splits.items()},
                "image_ids": image_ids,  # per split, the package image id of each question
                "split": f"val = {cfg.val_fraction:g} of the train images (seed {cfg.split_seed}); "
                         f"test = the package's test split"}
        return DatasetBundle(splits, classes=[], modalities=self.modality_specs(), info=info)

    def _load_captions(self) -> DatasetBundle:
        """One sample per image: ``{"image": [...]}`` with targets ``{"captions": [...]}``."""
        cfg = self.config
        pkg = self._package()
        paths = {"train": pkg.get_train_image_paths(), "test": pkg.get_test_image_paths()}
        facts, uncaptioned, asked = {}, {}, {}
        for source in ("train", "test"):
            qa: dict[int, list[tuple[str, str]]] = defaultdict(list)
            for text, answer, image in zip(*getattr(pkg, f"get_{source}_questions")()):
                qa[image].append((text, answer))
            known = {im: image_facts(pairs) for im, pairs in sorted(qa.items())}
            asked[source] = list(known)
            facts[source] = {im: f for im, f in known.items() if f != (None, None)}
            uncaptioned[source] = len(known) - len(facts[source])
        train_ids = sorted(facts["train"])
        val_images = self._val_images(asked["train"])  # the same val images as task vqa
        pools = {"train": ("train", [im for im in train_ids if im not in val_images]),
                 "val": ("train", [im for im in train_ids if im in val_images]),
                 "test": ("test", sorted(facts["test"]))}
        wanted: dict[str, int | None] = {"test": cfg.max_test_images, "train": None, "val": None}
        if cfg.max_train_images is not None:
            n_val = min(max(1, round(cfg.max_train_images * cfg.val_fraction)), len(pools["val"][1]))
            wanted.update(val=n_val, train=cfg.max_train_images - n_val)
        splits, image_ids = {}, {}
        for offset, (name, (source, pool)) in enumerate(pools.items(), 1):
            pool = np.array(pool)
            canonical = [captions_for(*facts[source][im], 1, np.random.default_rng(0))[0] for im in pool]
            if wanted[name] is not None:
                pool = pool[stratified_sample(canonical, wanted[name], np.random.default_rng([cfg.split_seed, offset]))]
            for im in pool:
                if im not in paths[source]:
                    raise DataError(f"easy-vqa {source} image {im} is asked about but missing from the package; "
                                    f"reinstall easy-vqa==1.0")
            source_index = ("train", "test").index(source)
            targets = [{"captions": captions_for(*facts[source][im], cfg.captions_per_image,
                                                 np.random.default_rng([cfg.caption_seed, source_index, int(im)]))}
                       for im in pool]
            splits[name] = MultimodalSplit({"image": [_load_rgb(paths[source][im]) for im in pool]}, targets,
                                           [f"{source}:image{im}" for im in pool])
            image_ids[name] = [int(im) for im in pool]
        info = {"task": "captioning", "sizes": {k: len(v) for k, v in splits.items()},
                "images": {k: len(v) for k, v in image_ids.items()}, "image_ids": image_ids,
                "captions": {"per_image": cfg.captions_per_image, "template_made": True,
                             "images_without_caption": uncaptioned},
                "split": f"val = {cfg.val_fraction:g} of the train images (seed {cfg.split_seed}); "
                         f"test = the package's test split"}
        return DatasetBundle(splits, classes=[], modalities=self.modality_specs(), info=info)
