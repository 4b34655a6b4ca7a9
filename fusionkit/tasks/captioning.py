"""Captioning: a generated caption per sample, scored with CIDEr (main metric), BLEU, METEOR, ROUGE-L.

Targets are ``{"captions": [str, ...]}``: one or several reference captions per sample.

Probe space (what the DMS heads predict): a *concept vocabulary*, the ``top_concepts`` content
words used by the most training samples (lower case, words of letters and digits; stop words of
:data:`STOP_WORDS` and caption boilerplate such as "image" or "picture" removed; ties broken by
name). Words found in more than ``max_concept_share`` of the training samples are left out too:
a word every caption uses ("handwritten" in every digits caption) tells the probes nothing about
the sample, and a probe that always predicts it would look right on every sample, so DMS would
trust an uninformative modality as much as the best one. A sample's probe target is soft: a ``(K,)`` distribution, uniform over the vocabulary
words found in any of its references, and an all-zero row (no label) when it has none. A probe
is right when its argmax is one of the sample's concepts (:mod:`fusionkit.tasks.targets`).

The language model is taught the sample's *first* reference (``answer_text``), every epoch:
the datasets put their canonical caption first (easy_vqa: "a red circle"; digits: "a handwritten
seven, ..."), the other references differ in phrasing only and are used by the metrics. Note the
decoder's ``max_answer_tokens`` cuts the taught caption (raise it for long captions).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register
from fusionkit.tasks.base import Task, TaskConfig, probe_summary

# A small fixed English stop-word list (function words), plus words every caption template uses
# whatever the picture shows. Number words ("one", "two") are content: digits captions name them.
STOP_WORDS = frozenset("""
a an the this that these those there here it its is are was were be been being am do does did
has have had of in on at to for with by from into onto over under about as than then so and or
but nor not no yes very too just also only can could will would should may might must shall
i you he she we they me him her us them my your his our their what which who whom whose when
where why how all any both each few more most other some such own same up down out off again
image picture photo photograph shows showing shown depicts view
""".split())


def content_words(caption: str) -> list[str]:
    """Lower-case words of letters and digits, stop words removed, in order."""
    return [w for w in re.findall(r"[a-z0-9]+", caption.lower()) if w not in STOP_WORDS]


class CaptioningConfig(TaskConfig):
    top_concepts: int = Field(200, ge=2, description=(
        "K: the probes predict over the K content words used by the most training samples "
        "(multi-label: each sample's target is uniform over its concepts)"))
    max_concept_share: float = Field(0.5, gt=0, le=1, description=(
        "leave out words found in more than this share of the training samples (they do not tell "
        "samples apart; 1 keeps every word)"))


def _captions(target: Any, where: str) -> list[str]:
    """The reference captions of one target; a DataError for none or an empty one."""
    caps = target.get("captions") if isinstance(target, dict) else None
    if not isinstance(caps, list):
        raise ConfigError(f"task captioning needs targets {{captions: [...]}}, but this dataset's targets look "
                          f"like {target!r:.80} ({where}); use a captioning dataset, e.g. data.task=captioning "
                          f"with easy_vqa, digits or a manifest")
    if not caps:
        raise DataError(f"captioning: {where} has no reference caption")
    if any(not isinstance(c, str) or not c.strip() for c in caps):
        raise DataError(f"captioning: {where} has an empty reference caption ({caps!r:.80})")
    return caps


@register("tasks", "captioning")
class CaptioningTask(Task):
    """Describe the inputs in words; CIDEr, BLEU-1..4, METEOR and ROUGE-L of the generated captions."""

    Config = CaptioningConfig
    generative = True

    def setup(self, bundle) -> None:
        split = bundle.splits["train"]
        counts: Counter[str] = Counter()  # word -> training samples using it
        for i, target in enumerate(split.targets):
            caps = _captions(target, f"training sample {split.ids[i]!r}")
            counts.update({w for c in caps for w in content_words(c)})
        limit = self.config.max_concept_share * len(split.targets)
        common = sorted(w for w, n in counts.items() if n > limit)
        ranked = sorted(((w, n) for w, n in counts.items() if n <= limit), key=lambda kv: (-kv[1], kv[0]))
        vocab = [w for w, _ in ranked][: self.config.top_concepts]
        if len(vocab) < 2:
            raise ConfigError(f"captioning: the training captions give a concept vocabulary of {len(vocab)} "
                              f"word(s) ({vocab}; left out as in more than task.max_concept_share = "
                              f"{self.config.max_concept_share:g} of the samples: {common[:5]}); the probes "
                              f"need at least 2 distinct content words")
        self.probe_classes = vocab

    def concepts(self, captions: list[str]) -> Tensor:
        """``(K,)`` float: uniform over the vocabulary words of ``captions``, zero if none."""
        index = {w: k for k, w in enumerate(self.probe_classes)}
        row = torch.zeros(len(self.probe_classes))
        found = sorted({index[w] for c in captions for w in content_words(c) if w in index})
        if found:
            row[found] = 1.0 / len(found)
        return row

    def collate_targets(self, targets: list[Any]) -> dict[str, Any]:
        """Soft probe targets ``(B, K)``, the references, and the text the LM is taught (the first
        reference; only when every sample has references: ``fusionkit generate`` passes None)."""
        caps = [None if t is None else _captions(t, "a sample") for t in targets]
        rows = [self.concepts(c) if c is not None else torch.zeros(len(self.probe_classes)) for c in caps]
        out = {"target": torch.stack(rows) if rows else torch.zeros(0, len(self.probe_classes)),  # (B, K)
               "captions": [list(c) if c is not None else [] for c in caps]}
        if all(c is not None for c in caps):
            out["answer_text"] = [c[0].strip() for c in caps]  # what the language model is taught to generate
        return out

    def loss(self, out, batch) -> Tensor:
        if out.lm_loss is None:
            raise ConfigError("task captioning needs a generative decoder (e.g. decoder: {name: llava}); "
                              "the configured decoder returns no language-model loss")
        return out.lm_loss

    def predict(self, model, batch, out) -> dict[str, Any]:
        return {"predictions": model.generate(batch, out), "captions": batch["captions"]}

    def summarize(self, c, modalities) -> dict[str, Any]:
        """``accuracy`` is CIDEr (the task's main metric, so it picks the best checkpoint; it is
        not bounded by 1), next to ``bleu_1..bleu_4``, ``meteor``, ``rouge_l`` and ``cider``."""
        from fusionkit.metrics.captions import caption_scores

        scores = caption_scores(c.get("predictions", []), c.get("captions", []))
        summary = probe_summary(c, modalities)
        return {"accuracy": scores["cider"], "unimodal_accuracy": summary["unimodal_accuracy"],
                "mean_weights": summary["mean_weights"], "n": int(len(c["target"])),
                # mean teacher-forced NLL of the first reference's tokens (monitor: loss)
                "nll": c.get("lm_loss"), "ece": None, "unimodal_ece": summary["unimodal_ece"], **scores}
